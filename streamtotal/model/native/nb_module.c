/* Python binding of nb_kernel.c: tensors are passed as data pointers (the Python side checks dtype, device,
 * contiguity and shapes, see streamtotal/model/native/__init__.py), and the GIL is released while the kernels run. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

int nb_forward(const float *x, const float *h, const float *log_lib, const float *theta, const float *log_theta,
               const double *c_table, int64_t width, int64_t n_rows, int64_t n_genes, float *ll, float *mu,
               float *log1p_mu_theta);
int nb_backward(const float *grad, const float *x, const float *mu, const float *log1p_mu_theta,
                 const float *log_lib, const float *theta, const double *d_table, int64_t width, int64_t n_rows,
                 int64_t n_genes, float *grad_h, float *grad_log_lib, float *grad_log_theta);

#define PTR(T, v) ((T *)(uintptr_t)(v))

static PyObject *py_nb_forward(PyObject *self, PyObject *args) {
    unsigned long long x, h, log_lib, theta, log_theta, c_table, ll, mu, lmt;
    long long width, n_rows, n_genes;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLKKK", &x, &h, &log_lib, &theta, &log_theta, &c_table, &width, &n_rows,
                          &n_genes, &ll, &mu, &lmt))
        return NULL;
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = nb_forward(PTR(const float, x), PTR(const float, h), PTR(const float, log_lib), PTR(const float, theta),
                     PTR(const float, log_theta), PTR(const double, c_table), width, n_rows, n_genes,
                     PTR(float, ll), PTR(float, mu), PTR(float, lmt));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(bad);
}

static PyObject *py_nb_backward(PyObject *self, PyObject *args) {
    unsigned long long grad, x, mu, lmt, log_lib, theta, d_table, grad_h, grad_log_lib, grad_log_theta;
    long long width, n_rows, n_genes;
    if (!PyArg_ParseTuple(args, "KKKKKKKLLLKKK", &grad, &x, &mu, &lmt, &log_lib, &theta, &d_table, &width, &n_rows,
                          &n_genes, &grad_h, &grad_log_lib, &grad_log_theta))
        return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = nb_backward(PTR(const float, grad), PTR(const float, x), PTR(const float, mu), PTR(const float, lmt),
                PTR(const float, log_lib), PTR(const float, theta), PTR(const double, d_table), width, n_rows, n_genes, PTR(float, grad_h), PTR(float, grad_log_lib),
                PTR(float, grad_log_theta));
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"nb_forward", py_nb_forward, METH_VARARGS,
     "nb_forward(x, h, log_lib, theta, log_theta, c_table, width, n_rows, n_genes, ll, mu, log1p_mu_theta) -> "
     "True when a count is not an integer in [0, 2^24) (pointers as ints)"},
    {"nb_backward", py_nb_backward, METH_VARARGS,
     "nb_backward(grad, x, mu, log1p_mu_theta, log_lib, theta, d_table, width, n_rows, n_genes, grad_h, "
     "grad_log_lib, grad_log_theta) (pointers as ints; 0 = output not wanted)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nb", "Fused NB likelihood kernels (CPU).", -1, methods};

PyMODINIT_FUNC PyInit__nb(void) { return PyModule_Create(&module); }
