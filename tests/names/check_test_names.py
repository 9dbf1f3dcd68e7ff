#!/usr/bin/env python3
"""Every doctest TEST_CASE name must survive CTest's discovery (doctest_discover_tests): a ';' is
CTest's list separator, so such a test is registered under a cut name whose --test-case filter
matches no test case, and CTest reports it passed having run nothing (15 cases did so until
2026-12-07); '*' and '?' are doctest's wildcards, so the entry would run other cases too. Names
must also be unique within a test binary's folder, so that one entry runs one case. And CI's
ThreadSanitizer pass (.ci/run, `ctest -R` over the concurrency tests) must select every case of
tests/concurrency: three 'regression: shm agreement:' cases were left out until 2026-12-07.
Usage: check_test_names.py SOURCE_DIR"""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1]) / "tests"
case = re.compile(r'TEST_CASE\("((?:[^"\\]|\\.)*)"')
problems = []
seen = {}
for path in sorted(root.rglob("*.cpp")):
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for name in case.findall(line):
            where = f"{path.relative_to(root.parent)}:{number}"
            bad = [c for c in ";*?" if c in name]
            if bad:
                problems.append(f"{where}: test case name holds {' '.join(repr(c) for c in bad)}: {name}")
            key = (path.parent, name)
            if key in seen:
                problems.append(f"{where}: test case name also at {seen[key]}: {name}")
            seen[key] = where
# The TSan pass's pattern, as .ci/run hands it to ctest -R (POSIX ERE; Python's re reads it alike).
ci = (root.parent / ".ci" / "run").read_text()
tsan = re.search(r"ctest --test-dir build-tsan[^\n]*(?:\\\n[^\n]*)*?-R '([^']*)'", ci)
if not tsan:
    problems.append(".ci/run: no `ctest --test-dir build-tsan ... -R '...'` found")
else:
    for (folder, name), where in seen.items():
        if folder.name == "concurrency" and not re.search(tsan.group(1), name):
            problems.append(f"{where}: not selected by CI's TSan pass (-R '{tsan.group(1)}'): {name}")
for p in problems:
    print(p)
print(f"check_test_names: {len(seen)} test case names, {len(problems)} problem(s)")
sys.exit(1 if problems else 0)
