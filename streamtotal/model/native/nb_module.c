/* Python binding of nb_kernel.c (RNA), protein_kernel.c (protein) and layer_kernel.c (encoder input, dropout): tensors are passed as data pointers (the Python side checks dtype, device,
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
void nb_tables(const float *theta, int64_t n_genes, int64_t width, double *c_table, double *d_table);
void protein_forward(const float *y, const float *mask, const float *log_back, const float *back_scale,
                     const float *back_mean, const float *fore_scale, const float *mix_logits, const float *theta,
                     int64_t theta_stride, const float *prior_mean, const float *prior_log_scale, int64_t n_rows,
                     int64_t n_prot, float *nll, float *kl, float *local);
void protein_backward(const float *grad_nll, const float *grad_kl, const float *local, int64_t theta_stride,
                      int64_t n_rows, int64_t n_prot, float *g_lb, float *g_a, float *g_pi, float *g_theta,
                      float *g_s, float *g_m, float *g_pm, float *g_pls);
void encoder_input(const float *rna, const float *protein, const float *measured, int64_t n_rows, int64_t n_genes,
                   int64_t n_prot, int scale, int log_transform, float *out);
void dropout_forward(const float *x, int64_t n, uint32_t threshold, float scale, uint64_t seed, float *out,
                     float *keep_scale);

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

static PyObject *py_nb_tables(PyObject *self, PyObject *args) {
    unsigned long long theta, c_table, d_table;
    long long n_genes, width;
    if (!PyArg_ParseTuple(args, "KLLKK", &theta, &n_genes, &width, &c_table, &d_table)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    nb_tables(PTR(const float, theta), n_genes, width, PTR(double, c_table), PTR(double, d_table));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_protein_forward(PyObject *self, PyObject *args) {
    unsigned long long y, mask, lb, s, m, a, pi, theta, pm, pls, nll, kl, local;
    long long theta_stride, n_rows, n_prot;
    if (!PyArg_ParseTuple(args, "KKKKKKKKLKKLLKKK", &y, &mask, &lb, &s, &m, &a, &pi, &theta, &theta_stride, &pm, &pls,
                          &n_rows, &n_prot, &nll, &kl, &local))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    protein_forward(PTR(const float, y), PTR(const float, mask), PTR(const float, lb), PTR(const float, s),
                    PTR(const float, m), PTR(const float, a), PTR(const float, pi), PTR(const float, theta),
                    theta_stride, PTR(const float, pm), PTR(const float, pls), n_rows, n_prot, PTR(float, nll),
                    PTR(float, kl), PTR(float, local));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_protein_backward(PyObject *self, PyObject *args) {
    unsigned long long g_nll, g_kl, local, g_lb, g_a, g_pi, g_theta, g_s, g_m, g_pm, g_pls;
    long long theta_stride, n_rows, n_prot;
    if (!PyArg_ParseTuple(args, "KKKLLLKKKKKKKK", &g_nll, &g_kl, &local, &theta_stride, &n_rows, &n_prot, &g_lb,
                          &g_a, &g_pi, &g_theta, &g_s, &g_m, &g_pm, &g_pls))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    protein_backward(PTR(const float, g_nll), PTR(const float, g_kl), PTR(const float, local), theta_stride, n_rows,
                     n_prot, PTR(float, g_lb), PTR(float, g_a), PTR(float, g_pi), PTR(float, g_theta),
                     PTR(float, g_s), PTR(float, g_m), PTR(float, g_pm), PTR(float, g_pls));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_encoder_input(PyObject *self, PyObject *args) {
    unsigned long long rna, protein, measured, out;
    long long n_rows, n_genes, n_prot;
    int scale, log_transform;
    if (!PyArg_ParseTuple(args, "KKKLLLiiK", &rna, &protein, &measured, &n_rows, &n_genes, &n_prot, &scale,
                          &log_transform, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    encoder_input(PTR(const float, rna), PTR(const float, protein), PTR(const float, measured), n_rows, n_genes,
                  n_prot, scale, log_transform, PTR(float, out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_dropout_forward(PyObject *self, PyObject *args) {
    unsigned long long x, seed, out, keep_scale;
    long long n;
    unsigned int threshold;
    float scale;
    if (!PyArg_ParseTuple(args, "KLIfKKK", &x, &n, &threshold, &scale, &seed, &out, &keep_scale)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dropout_forward(PTR(const float, x), n, threshold, scale, seed, PTR(float, out), PTR(float, keep_scale));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"nb_forward", py_nb_forward, METH_VARARGS,
     "nb_forward(x, h, log_lib, theta, log_theta, c_table, width, n_rows, n_genes, ll, mu, log1p_mu_theta) -> "
     "True when a count is not an integer in [0, 2^24) (pointers as ints)"},
    {"nb_backward", py_nb_backward, METH_VARARGS,
     "nb_backward(grad, x, mu, log1p_mu_theta, log_lib, theta, d_table, width, n_rows, n_genes, grad_h, "
     "grad_log_lib, grad_log_theta) (pointers as ints; 0 = output not wanted)"},
    {"nb_tables", py_nb_tables, METH_VARARGS,
     "nb_tables(theta, n_genes, width, c_table, d_table) (pointers as ints; d_table 0 = not wanted)"},
    {"protein_forward", py_protein_forward, METH_VARARGS,
     "protein_forward(y, mask, log_back, back_scale, back_mean, fore_scale, mix_logits, theta, theta_stride, "
     "prior_mean, prior_log_scale, n_rows, n_prot, nll, kl, local) (pointers as ints; local 0 = no derivatives)"},
    {"protein_backward", py_protein_backward, METH_VARARGS,
     "protein_backward(grad_nll, grad_kl, local, theta_stride, n_rows, n_prot, g_lb, g_a, g_pi, g_theta, g_s, g_m, "
     "g_pm, g_pls) (pointers as ints; 0 = gradient not wanted)"},
    {"encoder_input", py_encoder_input, METH_VARARGS,
     "encoder_input(rna, protein, measured, n_rows, n_genes, n_prot, scale, log_transform, out) (pointers as ints)"},
    {"dropout_forward", py_dropout_forward, METH_VARARGS,
     "dropout_forward(x, n, threshold, scale, seed, out, keep_scale) (pointers as ints)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", "Fused CPU kernels of totalVI's likelihoods and layers.", -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
