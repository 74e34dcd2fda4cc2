# mpiblmm_hdf5_prefix(<out-var>): the HDF5 prefix to give h5py's build as HDF5_DIR.
#
# h5py wants a folder with include/H5pubconf.h and lib/libhdf5.*. FindHDF5 reports include
# and library paths, which on some systems (Debian: /usr/include/hdf5/mpich and
# /usr/lib/<arch>/libhdf5_mpich.so) are not under one prefix; so try the usual layouts and
# keep the first whose H5pubconf.h is the very file FindHDF5 found.
function(mpiblmm_hdf5_prefix out_var)
  set(_conf "")
  foreach(_dir IN LISTS HDF5_C_INCLUDE_DIRS HDF5_INCLUDE_DIRS)
    if(NOT _conf AND EXISTS "${_dir}/H5pubconf.h")
      get_filename_component(_conf "${_dir}/H5pubconf.h" REALPATH)
      get_filename_component(_include_parent "${_dir}" DIRECTORY)
    endif()
  endforeach()
  list(GET HDF5_C_LIBRARIES 0 _lib)
  get_filename_component(_libdir "${_lib}" DIRECTORY)
  get_filename_component(_libdir_parent "${_libdir}" DIRECTORY)
  set(_candidates "${_include_parent}" "${_libdir_parent}" "${_libdir}")
  foreach(_flavour mpich openmpi)
    list(APPEND _candidates "${_libdir}/hdf5/${_flavour}")
  endforeach()
  foreach(_prefix IN LISTS _candidates)
    if(EXISTS "${_prefix}/include/H5pubconf.h")
      get_filename_component(_candidate_conf "${_prefix}/include/H5pubconf.h" REALPATH)
      if(_candidate_conf STREQUAL _conf)
        set(${out_var} "${_prefix}" PARENT_SCOPE)
        return()
      endif()
    endif()
  endforeach()
  message(WARNING "mpiblmm: no single HDF5 prefix holds include/H5pubconf.h (${_conf}) and "
                  "the library (${_lib}); set HDF5_DIR for scripts/setup.sh by hand.")
  set(${out_var} "${_include_parent}" PARENT_SCOPE)
endfunction()
