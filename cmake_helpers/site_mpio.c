/* Site check: every rank writes its own element of one dataset with HDF5's MPI-IO driver,
 * collectively, then rank 0 reads the dataset back. Prints one line on success. */
#include <hdf5.h>
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *path = argc > 1 ? argv[1] : "site_mpio.h5";

    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, MPI_COMM_WORLD, MPI_INFO_NULL);
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    hsize_t dims[1] = {(hsize_t)size}, start[1] = {(hsize_t)rank}, count[1] = {1};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dset = H5Dcreate2(file, "rank", H5T_NATIVE_INT, space, H5P_DEFAULT, H5P_DEFAULT,
                            H5P_DEFAULT);
    hid_t memspace = H5Screate_simple(1, count, NULL);
    H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE);
    herr_t status = H5Dwrite(dset, H5T_NATIVE_INT, memspace, space, dxpl, &rank);
    H5Pclose(dxpl); H5Sclose(memspace); H5Dclose(dset); H5Sclose(space);
    H5Fclose(file); H5Pclose(fapl);
    MPI_Barrier(MPI_COMM_WORLD);

    int ok = status >= 0;
    if (rank == 0 && ok) {
        int values[1024];
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        hid_t d = H5Dopen2(f, "rank", H5P_DEFAULT);
        ok = size <= 1024 && H5Dread(d, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values) >= 0;
        for (int i = 0; ok && i < size; i++) ok = values[i] == i;
        H5Dclose(d); H5Fclose(f);
        if (ok) printf("site_mpio: %d ranks wrote and read back %s\n", size, path);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Finalize();
    return ok ? 0 : 1;
}
