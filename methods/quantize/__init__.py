"""Weight quantization: grids, registered quantizers, packed artifacts and exact bit accounting."""

import methods.quantize.gptq  # noqa: F401
import methods.quantize.nupes  # noqa: F401
import methods.quantize.discquant  # noqa: F401

import methods.quantize.artifact  # noqa: F401
import methods.quantize.rtn  # noqa: F401
import methods.quantize.statsq  # noqa: F401
