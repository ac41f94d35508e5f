"""Drop the two known log lines that importing transformers' model code prints when torchao is installed.

transformers imports torchao whenever it is installed (`transformers.quantizers.quantizer_torchao`), so the first
import of any transformers model class runs torchao's package import. On a torch build without CUDA (or another
CUDA version) torchao warns for each of its CUDA kernel libraries (`torchao/_C*.so`: MX-FP8 and CUTLASS sm90 kernels)
that it cannot load, and torch warns that torchao registers its Enum classes as pytree constants, a call torch has
deprecated. Neither line concerns this package: its INT8 path (`deepseekv3.quantization`) computes with torch's own
`torch._int_mm`, not with those libraries, and the pytree call is torchao's. `quiet_torchao_import` filters exactly
those records, only for the duration of the import; every other record of both loggers still surfaces.
"""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_torchao_import"]

# torchao names each kernel library `<site-packages>/torchao/_C<name>.so` in its warning
_TORCHAO_KERNEL_LIBRARY = os.path.join("torchao", "_C")


class _TorchaoKernelLoadFilter(logging.Filter):
    """Drops torchao's "Failed to load .../torchao/_C....so: ..." warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        is_known = message.startswith("Failed to load ") and _TORCHAO_KERNEL_LIBRARY in message
        return not (is_known and record.levelno == logging.WARNING)


class _TorchaoEnumPytreeFilter(logging.Filter):
    """Drops torch's "<enum ...> is an Enum subclass and is now natively supported ..." notices for torchao's enums."""

    def filter(self, record: logging.LogRecord) -> bool:
        is_enum_notice = isinstance(record.msg, str) and record.msg.startswith("%s is an Enum subclass")
        enum_module = getattr(record.args[0], "__module__", "") if is_enum_notice and record.args else ""
        return not (enum_module.startswith("torchao") and record.levelno == logging.WARNING)


@contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """Filter torchao's import-time kernel-loading warnings and torch's pytree notice about torchao's enums.

    The filters sit on the two loggers that emit those lines (`torchao` and `torch.utils._pytree`) and are removed on
    exit, so later records of either logger, and every other record meanwhile, reach the handlers unchanged.
    """
    filters = [
        (logging.getLogger("torchao"), _TorchaoKernelLoadFilter()),
        (logging.getLogger("torch.utils._pytree"), _TorchaoEnumPytreeFilter()),
    ]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        yield
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)
