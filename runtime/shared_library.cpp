// libkvflow.so (target kvflow_shared, runtime/CMakeLists.txt) is kvflow_runtime linked whole,
// behind the exports of kvflow.map; CMake wants a source file of the target's own.
