# Included at the end of native/CMakeLists.txt: the container reader (part of edgemoe_core), the standalone
# benchmark binary `edgemoe-bench` and the container test program. Kept in its own file so the core's CMakeLists.txt
# and this one can change independently.

set(EDGEMOE_CONTAINER_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/src/json.c
  ${CMAKE_CURRENT_LIST_DIR}/src/container.c
  ${CMAKE_CURRENT_LIST_DIR}/src/load.c
)
target_sources(edgemoe_core PRIVATE ${EDGEMOE_CONTAINER_SOURCES})

# The streaming path (expert cache, I/O thread, HEBF scheduler and the streaming engine; issue 6): part of the core
# library. The model reaches it only through hooks (model.h emoe_stream_ops), so test_kernels builds without it.
set(EDGEMOE_STREAM_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/src/expert_cache.c
  ${CMAKE_CURRENT_LIST_DIR}/src/io_thread.c
  ${CMAKE_CURRENT_LIST_DIR}/src/hebf.c
  ${CMAKE_CURRENT_LIST_DIR}/src/stream_forward.c
  ${CMAKE_CURRENT_LIST_DIR}/src/stream_load.c
)
target_sources(edgemoe_core PRIVATE ${EDGEMOE_STREAM_SOURCES})

# The core's sources, to compile them into the executables: edgemoe-bench is one self-contained file that can be
# copied to a board or phone without the shared library next to it.
if(DEFINED EDGEMOE_SOURCES)
  set(_emoe_core_sources ${EDGEMOE_SOURCES})
else()
  get_target_property(_emoe_core_sources edgemoe_core SOURCES)
endif()
list(REMOVE_ITEM _emoe_core_sources ${EDGEMOE_CONTAINER_SOURCES} src/json.c src/container.c)
list(REMOVE_ITEM _emoe_core_sources ${EDGEMOE_STREAM_SOURCES})
set(EDGEMOE_ALL_SOURCES ${_emoe_core_sources} ${EDGEMOE_CONTAINER_SOURCES} ${EDGEMOE_STREAM_SOURCES})

add_executable(edgemoe-bench ${CMAKE_CURRENT_LIST_DIR}/tools/edgemoe_bench.c ${EDGEMOE_ALL_SOURCES})
target_include_directories(edgemoe-bench PRIVATE ${CMAKE_CURRENT_LIST_DIR}/include ${CMAKE_CURRENT_LIST_DIR}/src)
target_compile_options(edgemoe-bench PRIVATE ${EDGEMOE_C_FLAGS} ${EDGEMOE_SAN_FLAGS})
target_link_options(edgemoe-bench PRIVATE ${EDGEMOE_SAN_FLAGS})
target_link_libraries(edgemoe-bench PRIVATE Threads::Threads m)

if(EDGEMOE_BUILD_TESTS)
  add_executable(test_container ${CMAKE_CURRENT_LIST_DIR}/tests/test_container.c ${EDGEMOE_ALL_SOURCES})
  target_include_directories(test_container PRIVATE ${CMAKE_CURRENT_LIST_DIR}/include ${CMAKE_CURRENT_LIST_DIR}/src)
  target_compile_options(test_container PRIVATE ${EDGEMOE_C_FLAGS} ${EDGEMOE_SAN_FLAGS})
  target_link_options(test_container PRIVATE ${EDGEMOE_SAN_FLAGS})
  target_link_libraries(test_container PRIVATE Threads::Threads m)
  # Without a container argument the program runs its JSON and synthetic-container tests only.
  add_test(NAME test_container COMMAND test_container)
endif()

if(SKBUILD)
  # Into the Python package (wheel.install-dir = edgemoe): edgemoe/bin/edgemoe-bench.
  install(TARGETS edgemoe-bench RUNTIME DESTINATION bin)
endif()

if(EDGEMOE_BUILD_TESTS)
  # The streaming path's pieces tested alone: random load with byte-accounting checks, eviction order, read and
  # checksum errors, HEBF order.
  add_executable(test_cache ${CMAKE_CURRENT_LIST_DIR}/tests/test_cache.c ${EDGEMOE_ALL_SOURCES})
  target_include_directories(test_cache PRIVATE ${CMAKE_CURRENT_LIST_DIR}/include ${CMAKE_CURRENT_LIST_DIR}/src)
  target_compile_options(test_cache PRIVATE ${EDGEMOE_C_FLAGS} ${EDGEMOE_SAN_FLAGS})
  target_link_options(test_cache PRIVATE ${EDGEMOE_SAN_FLAGS})
  target_link_libraries(test_cache PRIVATE Threads::Threads m)
  add_test(NAME test_cache COMMAND test_cache)
endif()
