#!/usr/bin/env python3
"""A delayed Ethernet link in userspace, for kernels without netem (used by netns_test.sh).

Creates two TAP devices, moves one into each of two network namespaces (named there NAME_A and
NAME_B, set to MTU and up), and forwards every frame that one end's kernel sends to the other end,
in both directions, each held for DELAY_MS first. Each direction is a FIFO of (release time,
frame): frames leave in the order they came, none earlier than DELAY_MS after it was read. The
loop sleeps in epoll until a device has frames or the oldest held frame is due; it reads and
writes up to BATCH frames per device per wakeup.

Once both devices are in place it writes "ready" to --ready FILE. On SIGTERM or SIGINT it stops,
writes its counters as JSON to --stats FILE (frames and bytes forwarded each way, frames dropped,
the least and the most time a frame was held, the most bytes held at once) and to stderr, and
exits 0; the devices go away with their file descriptors.

Exit status: 0 stopped by a signal; 3 TAP devices are not available here (no /dev/net/tun, or
the kernel refused TUNSETIFF); 1 any other failure. Needs root (CAP_NET_ADMIN) and `ip`.

Usage: delay_link.py --delay-ms D --ns-a NS --name-a NAME --ns-b NS --name-b NAME
                     [--mtu 9000] [--ready FILE] [--stats FILE]
"""
import argparse
import collections
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
BATCH = 256
# A direction stops reading while it holds this much (the sending kernel then queues, and at
# worst drops, at its TAP device, as a full link would).
MAX_HELD_BYTES = 64 << 20


class TapUnavailable(Exception):
    pass


def log(msg):
    print(f"delay_link: {msg}", file=sys.stderr, flush=True)


def ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or 'exit %d' % r.returncode}")


def open_tap(name):
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapUnavailable(f"cannot open /dev/net/tun: {e.strerror}") from e
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise TapUnavailable(f"TUNSETIFF {name} (IFF_TAP|IFF_NO_PI): {e.strerror}") from e
    return fd


class Direction:
    def __init__(self, name, src, dst, delay):
        self.name, self.src, self.dst, self.delay = name, src, dst, delay
        self.held = collections.deque()  # (release time, frame), release times never decrease
        self.held_bytes = 0
        self.frames = self.bytes = self.dropped = 0
        self.min_hold = self.max_hold = None
        self.max_held_bytes = 0

    def read(self):
        """Reads up to BATCH frames."""
        for _ in range(BATCH):
            if self.held_bytes >= MAX_HELD_BYTES:
                return
            try:
                frame = os.read(self.src, 65536)
            except BlockingIOError:
                return
            self.held.append((time.monotonic() + self.delay, frame))
            self.held_bytes += len(frame)
            self.max_held_bytes = max(self.max_held_bytes, self.held_bytes)

    def release(self, now):
        """Writes the frames due by `now` (at most BATCH); returns the next release time or None."""
        n = 0
        while self.held and self.held[0][0] <= now and n < BATCH:
            due, frame = self.held.popleft()
            self.held_bytes -= len(frame)
            n += 1
            try:
                os.write(self.dst, frame)
            except OSError:
                # The receiving device is down or its queue is full: the frame is lost, as on a
                # wire. TCP sends it again.
                self.dropped += 1
                continue
            hold = time.monotonic() - (due - self.delay)
            self.frames += 1
            self.bytes += len(frame)
            if self.min_hold is None or hold < self.min_hold:
                self.min_hold = hold
            if self.max_hold is None or hold > self.max_hold:
                self.max_hold = hold
            now = time.monotonic()
        return self.held[0][0] if self.held else None

    def stats(self):
        ms = lambda s: None if s is None else round(s * 1000, 3)
        return {"frames": self.frames, "bytes": self.bytes, "dropped": self.dropped,
                "min_hold_ms": ms(self.min_hold), "max_hold_ms": ms(self.max_hold),
                "max_held_bytes": self.max_held_bytes}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--ns-a", required=True)
    p.add_argument("--name-a", required=True)
    p.add_argument("--ns-b", required=True)
    p.add_argument("--name-b", required=True)
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--ready")
    p.add_argument("--stats")
    a = p.parse_args()
    if a.delay_ms < 0:
        p.error("--delay-ms must be >= 0")

    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stopping = []
    def on_signal(signum, _frame):
        stopping.append(signum)
    signal.set_wakeup_fd(stop_w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Created under names unique in this namespace, then moved and renamed.
    fds = []
    try:
        for i, (ns, name) in enumerate(((a.ns_a, a.name_a), (a.ns_b, a.name_b))):
            tmp = f"kvdl{os.getpid()}{'ab'[i]}"
            fds.append(open_tap(tmp))
            ip("link", "set", "dev", tmp, "netns", ns)
            ip("-n", ns, "link", "set", "dev", tmp, "name", name)
            ip("-n", ns, "link", "set", "dev", name, "mtu", str(a.mtu))
            ip("-n", ns, "link", "set", "dev", name, "up")
    except TapUnavailable as e:
        log(f"TAP devices are not available: {e}")
        return 3
    except RuntimeError as e:
        log(f"cannot set the devices up: {e}")
        return 1
    fa, fb = fds
    delay = a.delay_ms / 1000.0
    dirs = {fa: Direction("a_to_b", fa, fb, delay), fb: Direction("b_to_a", fb, fa, delay)}
    log(f"{a.ns_a}/{a.name_a} <-> {a.ns_b}/{a.name_b}, one-way delay {a.delay_ms} ms, mtu {a.mtu}")
    if a.ready:
        with open(a.ready, "w") as f:
            f.write("ready\n")

    ep = select.epoll()
    ep.register(stop_r, select.EPOLLIN)
    for fd in dirs:
        ep.register(fd, select.EPOLLIN)
    reading = set(dirs)  # devices watched for frames (one whose direction is full is not)
    start = time.monotonic()
    while not stopping:
        now = time.monotonic()
        nxt = None
        for d in dirs.values():
            t = d.release(now)
            if t is not None and (nxt is None or t < nxt):
                nxt = t
        for fd, d in dirs.items():
            want = d.held_bytes < MAX_HELD_BYTES
            if want != (fd in reading):
                ep.modify(fd, select.EPOLLIN if want else 0)
                (reading.add if want else reading.discard)(fd)
        # Level-triggered: a device with frames left after its batch wakes the next poll at once.
        if nxt is None:
            timeout = -1
        else:
            timeout = max(nxt - time.monotonic(), 0)  # epoll rounds up to whole milliseconds
        events = ep.poll(timeout)
        ready = {fd for fd, _ in events}
        for fd in ready & dirs.keys():
            dirs[fd].read()
        if stop_r in ready:
            try:
                os.read(stop_r, 64)
            except BlockingIOError:
                pass

    stats = {"delay_ms": a.delay_ms, "mtu": a.mtu, "seconds": round(time.monotonic() - start, 3),
             "signal": signal.Signals(stopping[0]).name,
             **{d.name: d.stats() for d in dirs.values()},
             "held_at_exit": sum(len(d.held) for d in dirs.values())}
    for fd in dirs:
        os.close(fd)
    line = json.dumps(stats, sort_keys=True)
    log(line)
    if a.stats:
        with open(a.stats + ".tmp", "w") as f:
            f.write(line + "\n")
        os.replace(a.stats + ".tmp", a.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
