// The Python module `orwcfm_fast._C`.
//
// It holds no Python functions: importing it runs the static TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL registrations of the other translation units, after which the
// ops are reachable as torch.ops.orwcfm_fast.<op>. Using the plain CPython API instead
// of pybind11 keeps the build fast.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                    // m_name
      "orwcfm_fast fused ops; registers torch.ops.orwcfm_fast", // m_doc
      -1,                                                      // m_size
      nullptr,                                                 // m_methods
  };
  return PyModule_Create(&module_def);
}

}  // extern "C"
