"""Quiet command-line output: no TensorFlow/absl/XLA/CUDA start-up noise on a healthy run.

TensorFlow and XLA write notices from C++ straight to file descriptor 2, some before any of
their logging settings apply ("All log messages before absl::InitializeLog() ...",
``cudart_stub.cc ... Could not find cuda drivers``, ``cpu_feature_guard``, ``E0000 ...
cuInit``), so environment variables alone cannot silence them. :func:`quiet_process` sets
the variables that do help (before TensorFlow or JAX is imported) and then routes fd 2
through a filter thread that drops exactly the known noise lines: every other line, our own
warnings and errors, tracebacks and real library warnings, passes unchanged.

``--verbose`` on the command line or ``MU2NET_VERBOSE=1`` turns all of this off.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import sys
import threading

VERBOSE_ENV = "MU2NET_VERBOSE"

# Lines that are start-up noise on a machine without (or with) an accelerator.
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:. ]+\d+ [\w.]+:\d+\] "  # absl C++ INFO/WARNING lines (TF, XLA)
    r"|E\d{4} [\d:. ]+\d+ \S*(cuda|cuInit|cudnn|cufft|cublas|rocm)\S*:\d+\] "
    r"|E\d{4} [\d:. ]+\d+ \S+:\d+\] failed call to cuInit"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|WARNING:absl:Variant folder .* has no dataset_info\.json"
    r"|WARNING:absl:`TensorInfo\.dtype` is deprecated"
    r"|An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib"
    r"|WARNING:tensorflow:From \S+: .* is deprecated and will be removed"
    r")"
)
# A TensorFlow deprecation notice goes on for two more lines: drop them with it.
_FOLLOWS = re.compile(r"^WARNING:tensorflow:From \S+: .* is deprecated")
_FOLLOW_LINES = 2


def verbose_requested(argv: list[str]) -> bool:
    """Whether ``--verbose`` is in ``argv`` or ``MU2NET_VERBOSE`` is set to a true value."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return "--verbose" in argv or env not in ("", "0", "false", "no")


def has_accelerator() -> bool:
    """True when a GPU or TPU device node exists (then JAX picks its own platform)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or glob.glob("/dev/kfd"))


def set_quiet_env() -> None:
    """Environment for quiet TensorFlow/JAX; call before either is imported (never overrides)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's own INFO and WARNING
    if not has_accelerator():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no probing of CUDA/TPU plugins
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


class _Filter:
    """Copies a pipe to ``out_fd`` line by line (ends: newline or CR), dropping NOISE lines."""

    def __init__(self, out_fd: int):
        self.out_fd = out_fd
        self.read_fd, self.write_fd = os.pipe()
        self.skip = 0  # lines still to drop after a multi-line notice
        self.thread = threading.Thread(target=self.pump, name="mu2net-stderr", daemon=True)

    def pump(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"(?<=[\r\n])", pending)
            pending = parts.pop()  # incomplete last segment (b"" when chunk ended a line)
            self.write(parts)
        self.write([pending])
        os.close(self.read_fd)

    def write(self, parts: list[bytes]) -> None:
        kept = []
        for part in parts:
            text = part.decode("utf-8", "replace")
            if self.skip and part.endswith(b"\n"):
                self.skip -= 1
            elif part and not NOISE.match(text):
                kept.append(part)
            elif _FOLLOWS.match(text):
                self.skip = _FOLLOW_LINES
        if kept:
            os.write(self.out_fd, b"".join(kept))


def quiet_process() -> None:
    """Sets the quiet environment and filters known noise out of this process's fd 2.

    Child processes inherit the filtered descriptor. At exit the original stderr comes back
    and the filter drains what is left.
    """
    set_quiet_env()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreter): nothing to filter
        return
    flt = _Filter(saved)
    os.dup2(flt.write_fd, 2)
    os.close(flt.write_fd)
    flt.thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes our end of the pipe: the filter sees EOF (or children's)
        flt.thread.join(timeout=2.0)

    atexit.register(restore)
