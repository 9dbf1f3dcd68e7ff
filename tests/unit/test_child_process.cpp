// command/child_process: a child's stdin and stdout as pipes (bench gpu's UCX receiver is driven
// this way).
#include <doctest/doctest.h>

#include "command/child_process.hpp"

using kvflow::command::child_process;

TEST_CASE("child_process: lines written to a piped stdin come back from its stdout, closing it ends the child") {
  auto c = child_process::start({"cat"}, {}, true, true);
  REQUIRE(c.ok());
  auto& cat = c.value();
  REQUIRE(cat.write_line("first").ok());
  REQUIRE(cat.write_line("second line").ok());
  auto a = cat.read_line(std::chrono::seconds(10));
  auto b = cat.read_line(std::chrono::seconds(10));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a.value() == "first");
  CHECK(b.value() == "second line");
  cat.close_input();
  CHECK_FALSE(cat.write_line("after").ok());
  auto code = cat.wait(std::chrono::seconds(10));
  REQUIRE(code.ok());
  CHECK(code.value() == 0);
}

TEST_CASE("child_process: write_line without a piped stdin is an error, not a write elsewhere") {
  auto c = child_process::start({"true"}, {}, false);
  REQUIRE(c.ok());
  CHECK_FALSE(c.value().write_line("x").ok());
  CHECK(c.value().wait(std::chrono::seconds(10)).ok());
}
