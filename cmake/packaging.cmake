# What `cmake --install BUILD [--prefix DIR]` puts under the prefix:
#   include/kvflow/kvflow.hpp, kvflow.h     the public headers (nothing internal)
#   lib/libkvflow.so                        the library (runtime/CMakeLists.txt: kvflow_shared)
#   lib/cmake/kvflow/                       find_package(kvflow): the imported target kvflow::kvflow
#   lib/pkgconfig/kvflow.pc                 pkg-config --cflags --libs kvflow
#   bin/kvflow                              the command
#   lib/kvflow/ucx/                         kvflow's own UCX (.deps/ucx), when built against it
# (lib is CMAKE_INSTALL_LIBDIR: lib/<multiarch> for the /usr prefix on Debian.) Every installed
# path is relative to the prefix, so the tree works wherever it is installed or moved.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(KVFLOW_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/kvflow)

install(FILES ${PROJECT_SOURCE_DIR}/include/kvflow/kvflow.hpp ${PROJECT_SOURCE_DIR}/include/kvflow/kvflow.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvflow)
install(TARGETS kvflow RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS kvflow_shared EXPORT kvflow-targets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})

# UCX: a site UCX (KVFLOW_UCX_ROOT) stays where it is, reached through RUNPATH like CUDA's
# libraries. kvflow's own lives in the checkout (.deps/ucx), so it is installed with kvflow, in
# the wheel's layout (its CUDA modules reach the bundled cudart through RPATH), without what
# only its own tools use; the library and the command find it through $ORIGIN.
if(KVFLOW_UCX_BUNDLED)
  set(KVFLOW_INSTALL_UCXDIR ${CMAKE_INSTALL_LIBDIR}/kvflow/ucx)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/.deps/ucx/ DESTINATION ${KVFLOW_INSTALL_UCXDIR}
          USE_SOURCE_PERMISSIONS
          PATTERN include EXCLUDE PATTERN bin EXCLUDE PATTERN etc EXCLUDE PATTERN cmake EXCLUDE
          PATTERN pkgconfig EXCLUDE PATTERN __pycache__ EXCLUDE PATTERN "*.py" EXCLUDE
          PATTERN "*.txt" EXCLUDE PATTERN GIT_COMMIT EXCLUDE PATTERN "libucs_signal.*" EXCLUDE
          PATTERN "libucx_perftest*" EXCLUDE PATTERN "libgomp*" EXCLUDE PATTERN "lib*.so" EXCLUDE)
  file(RELATIVE_PATH kvflow_bin_to_lib "/prefix/${CMAKE_INSTALL_BINDIR}" "/prefix/${CMAKE_INSTALL_LIBDIR}")
  set(kvflow_cuda_rpath "")
  if(CUDAToolkit_FOUND)
    set(kvflow_cuda_rpath ${CUDAToolkit_LIBRARY_DIR})
  endif()
  set_target_properties(kvflow_shared PROPERTIES INSTALL_RPATH_USE_LINK_PATH OFF
    INSTALL_RPATH "$ORIGIN/kvflow/ucx/libucx/lib;${kvflow_cuda_rpath}")
  set_target_properties(kvflow PROPERTIES INSTALL_RPATH_USE_LINK_PATH OFF
    INSTALL_RPATH "$ORIGIN/${kvflow_bin_to_lib}/kvflow/ucx/libucx/lib;${kvflow_cuda_rpath}")
endif()

# The CMake package: kvflow::kvflow, whose interface is the installed include directory and the
# library alone (its own dependencies are the library's, not the consumer's).
install(EXPORT kvflow-targets NAMESPACE kvflow:: FILE kvflow-targets.cmake
        DESTINATION ${KVFLOW_INSTALL_CMAKEDIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/kvflow-config.cmake.in
                              ${PROJECT_BINARY_DIR}/kvflow-config.cmake
                              INSTALL_DESTINATION ${KVFLOW_INSTALL_CMAKEDIR})
# 0.x: a minor version may change the API.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvflow-config-version.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvflow-config.cmake ${PROJECT_BINARY_DIR}/kvflow-config-version.cmake
        DESTINATION ${KVFLOW_INSTALL_CMAKEDIR})

# pkg-config: paths relative to the .pc file's own directory (${pcfiledir}), so that the same
# file serves any prefix given at install time.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(KVFLOW_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(KVFLOW_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  set(KVFLOW_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  file(RELATIVE_PATH kvflow_pc_up "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
  string(REGEX REPLACE "/$" "" kvflow_pc_up "${kvflow_pc_up}")
  set(KVFLOW_PC_PREFIX "\${pcfiledir}/${kvflow_pc_up}")
  set(KVFLOW_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(KVFLOW_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/kvflow.pc.in ${PROJECT_BINARY_DIR}/kvflow.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kvflow.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
