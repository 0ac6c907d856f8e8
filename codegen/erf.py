"""erf in float64 from exp and a Chebyshev series, for targets without a double-precision erf (numpy, ONNX Runtime).

erfc(z) = t * exp(-z^2 + sum_k C_k T_k(2t - 1)) with t = 2 / (2 + z), z >= 0 (the form of Numerical Recipes' erfcc).
The coefficients were fitted once, by least squares in the Chebyshev basis against `math.erfc` on z in [0, 25], and
are kept here as constants so that generated code is byte-identical on every machine; `tests/codegen/test_erf.py`
checks the error stays below 1e-14 against `math.erf`.
"""

from __future__ import annotations

ERFC_CHEB: tuple[float, ...] = (
    -0.651326859884375,
    0.6419697923436422,
    0.019476473216701325,
    -0.009561514798788275,
    -0.0009465953332184884,
    0.0003668394874519536,
    4.2523334234488914e-05,
    -2.0278586496863175e-05,
    -1.6242826931075284e-06,
    1.3036495880057096e-06,
    1.563166754073123e-08,
    -8.524237057549135e-08,
    6.5324692828725455e-09,
    5.056682950133833e-09,
    -9.893466643538512e-10,
    -2.2885109299480525e-10,
    9.7528071683382e-11,
    1.6634907751798733e-12,
    -6.402061151643095e-12,
    5.880930750146184e-13,
    4.972651544613725e-13,
    -2.1713585780788998e-13,
    5.5604020718449484e-14,
    -1.9439869826127813e-14,
    9.417538582861581e-15,
    -3.766662998328184e-15,
    1.2305481320733114e-15,
)

NUMPY_SOURCE = f'''
_ERFC_CHEB = {repr(ERFC_CHEB)}


def _erf(x):
    """erf in float64 to about 1e-15: erfc(z) = t exp(-z^2 + Chebyshev series in t), t = 2 / (2 + z)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    t = 2.0 / (2.0 + z)
    u2 = 2.0 * (2.0 * t - 1.0)
    b1 = np.zeros_like(z)
    b2 = np.zeros_like(z)
    for c in _ERFC_CHEB[:0:-1]:
        b1, b2 = u2 * b1 - b2 + c, b1
    series = _ERFC_CHEB[0] + 0.5 * u2 * b1 - b2
    return np.sign(x) * (1.0 - t * np.exp(-z * z + series))
'''
