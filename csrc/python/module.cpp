// The Python module gradsieve._C. Importing it loads this shared library, whose static
// registrations (csrc/ops, csrc/cpu, csrc/cuda_launch) add the ops to torch.ops.gradsieve. The
// module itself holds nothing. Only setup.py builds this folder; the CMake op library has no Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
