// The doctest runner of kvflow_actor_tests; the cases live in the test_*.cpp files.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
