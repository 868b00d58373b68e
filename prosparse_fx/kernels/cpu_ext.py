"""A small C++ helper for the CPU sparse FFN, compiled on first use with the machine's compiler
(``torch.utils.cpp_extension.load_inline``, cached under ``~/.cache/torch_extensions``).

Gathering the active rows with ``index_select`` before a matmul copies them (read, write, read
again); these loops read each active row once, in place, across all threads:

* ``gather_gemv(w, idx, x)``: ``out[m, i] = dot(w[idx[i]], x[m])`` (sparse up_proj);
* ``gather_axpy(w_t, idx, x1)``: ``y[m] = sum_i x1[m, i] * w_t[idx[i]]`` (sparse down_proj).

float32, contiguous tensors only. If there is no compiler (or ``PROSPARSE_NO_CPP=1``), :func:`get`
returns ``None`` and the pure-torch path runs instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

torch::Tensor gather_gemv(torch::Tensor w, torch::Tensor idx, torch::Tensor x) {
  const int64_t K = idx.size(0), D = w.size(1), N = x.size(0);
  auto out = torch::empty({N, K}, x.options());
  const float* W = w.data_ptr<float>();
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, K, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = W + I[i] * D;
      for (int64_t m = 0; m < N; ++m) {
        const float* xm = X + m * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < D; ++k) acc += row[k] * xm[k];
        O[m * K + i] = acc;
      }
    }
  });
  return out;
}

torch::Tensor gather_axpy(torch::Tensor wt, torch::Tensor idx, torch::Tensor x1) {
  const int64_t K = idx.size(0), DOUT = wt.size(1), N = x1.size(0);
  const int64_t T = at::get_num_threads();
  auto partial = torch::zeros({T, N, DOUT}, x1.options());
  const float* W = wt.data_ptr<float>();
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* A = x1.data_ptr<float>();
  float* P = partial.data_ptr<float>();
  at::parallel_for(0, K, 8, [&](int64_t begin, int64_t end) {
    float* acc = P + at::get_thread_num() * N * DOUT;
    for (int64_t i = begin; i < end; ++i) {
      const float* row = W + I[i] * DOUT;
      for (int64_t m = 0; m < N; ++m) {
        const float a = A[m * K + i];
        if (a == 0.f) continue;  // NaN is not 0: it propagates
        float* ym = acc + m * DOUT;
#pragma omp simd
        for (int64_t c = 0; c < DOUT; ++c) ym[c] += a * row[c];
      }
    }
  });
  return partial.sum(0);
}
"""

_state: dict[str, Any] = {}


def get() -> Any | None:
    """The compiled module, or ``None`` when it cannot be built (logged once)."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("PROSPARSE_NO_CPP") != "1":
        try:
            from torch.utils.cpp_extension import load_inline

            module = load_inline(
                name="prosparse_cpu_ffn",
                cpp_sources=_SOURCE,
                functions=["gather_gemv", "gather_axpy"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, unsupported platform
            log.warning("prosparse CPU helper not built (%s); using the torch path", exc)
            module = None
    _state["module"] = module
    return module
