# mhaConfig.cmake - find_package(mha) for an installed mha.h.
# Gives the INTERFACE target mha::mha: the include directory that holds
# mha.h and mha/{safetensors,npy,heatmap}.h, and libm where there is one.
# The installed tree is relocatable: the prefix is found from this file's place
# (<prefix>/share/cmake/mha/).
get_filename_component(_mha_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET mha::mha)
  add_library(mha::mha INTERFACE IMPORTED)
  set_target_properties(mha::mha PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_mha_prefix}/include")
  if(UNIX)
    set_target_properties(mha::mha PROPERTIES INTERFACE_LINK_LIBRARIES m)
  endif()
endif()
unset(_mha_prefix)
