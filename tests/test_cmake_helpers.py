"""cmake_helpers/: the HPC site check configures, finds parallel HDF5 and passes its CTest.

Runs only the "site" tests (a C program writing one file with HDF5's MPI-IO driver at
1, 2 and 3 ranks); the "mpiblmm" CTest tests repeat tests/mpi, which scripts/test.sh runs.
"""

import shutil
import subprocess

import pytest

pytestmark = [
    pytest.mark.spawns_mpiexec,
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None,
                       reason="cmake not installed"),
]


def test_cmake_finds_parallel_hdf5_and_site_tests_pass(repo_root, tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(repo_root / "cmake_helpers"), "-B", str(build)],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "HDF5_DIR=" in configure.stdout and "MPICC=" in configure.stdout
    env_file = (build / "mpiblmm-site.env").read_text()
    assert "MPICC=" in env_file and "HDF5_DIR=" in env_file
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    tests = subprocess.run(["ctest", "--test-dir", str(build), "-L", "site",
                            "--output-on-failure"], capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "100% tests passed" in tests.stdout
