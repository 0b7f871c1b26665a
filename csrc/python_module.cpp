// A plain CPython module, so `import peft_kernels._C` loads the library and runs the
// TORCH_LIBRARY registrations in ops.cpp (no pybind11 needed). Only the setup.py build uses this
// file; the CMake build makes a plain shared library for torch.ops.load_library.
#include <Python.h>

static struct PyModuleDef pk_module = {PyModuleDef_HEAD_INIT, "_C", "peft_kernels compiled ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pk_module); }
