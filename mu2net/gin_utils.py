"""t5x-style gin flags shared by the binaries: --gin_file, --gin_bindings, --gin.KEY=VALUE.

Gin files are looked up in the user's ``--gin_search_paths``, the working directory and the
configs shipped inside the package (``mu2net.gin``), so binaries work without a source checkout.
Gin files are only ever read from paths the user passes (or includes of those files).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from mu2net.errors import Mu2netError
from mu2net.train._gin import gin


class GinConfigError(Mu2netError, ValueError):
    """A gin file or binding that cannot be applied; names the file or key."""


def package_gin_dir() -> str:
    """Directory of the gin configs shipped with mu2net.

    Installed from a wheel they sit in ``mu2net/gin/``; in a source checkout (and an editable
    install) in the repository's top-level ``gin/``. Neither folder has an ``__init__.py``,
    so ``import gin`` from the repository root finds gin-config, never the configs.
    """
    import mu2net

    package = os.path.dirname(os.path.abspath(mu2net.__file__))
    for folder in (os.path.join(package, "gin"), os.path.join(os.path.dirname(package), "gin")):
        if os.path.isdir(os.path.join(folder, "runs")):
            return folder
    raise GinConfigError(f"mu2net's gin configs are missing: no gin/runs/ next to {package}")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns t5x's ``--gin.KEY=VALUE`` shorthand into ``--gin_bindings=KEY=VALUE``."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin.") :].split("=", 1)
            out.append(f"--gin_bindings={key} = {value}")
        else:
            out.append(arg)
    return out


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --gin_file (repeatable), --gin_bindings (repeatable) and --gin_search_paths."""
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="gin config file (repeatable); relative to search paths",
    )
    parser.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        help="gin binding 'KEY = VALUE' (repeatable); also --gin.KEY=VALUE",
    )
    parser.add_argument(
        "--gin_search_paths",
        default="",
        help="comma-separated directories searched for gin files and includes",
    )


def parse_gin(args: argparse.Namespace, finalize: bool = True) -> None:
    """Applies the gin files and bindings of ``args``; errors name the file or binding."""
    search = [p for p in args.gin_search_paths.split(",") if p] + [os.getcwd(), package_gin_dir()]
    for path in search:
        gin.add_config_file_search_path(path)
    files = []
    for f in args.gin_file:
        found = _resolve(f, search)
        if found is None:
            raise GinConfigError(f"--gin_file={f}: not found in {search}")
        files.append(found)
    quiet = _DropPathNotFound()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, args.gin_bindings, finalize_config=False)
    except (OSError, ValueError, KeyError, NameError, ImportError, SyntaxError) as e:
        raise GinConfigError(f"bad gin configuration: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    if finalize:
        gin.finalize()


class _DropPathNotFound(logging.Filter):
    """Gin logs every search path it tries for an include; only the final failure matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Path not found" not in record.getMessage()


def _resolve(name: str, search: Sequence[str]) -> str | None:
    if os.path.isabs(name):
        return name if os.path.isfile(name) else None
    for d in search:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def check_required_macros(names: Sequence[str], declared_in: str = "") -> None:
    """Raises :class:`GinConfigError` naming every REQUIRED macro the configuration left unset."""
    missing = []
    for name in names:
        try:
            value = gin.query_parameter(f"%{name}")
        except ValueError:
            missing.append(name)
            continue
        if value is None or value in ("", "REQUIRED") or repr(value) == "%gin.REQUIRED":
            missing.append(name)
    if missing:
        where = f" (declared in {declared_in})" if declared_in else ""
        raise GinConfigError(
            f"required gin macro(s) not set: {missing}{where}; "
            f"set them with e.g. --gin.{missing[0]}=\"'...'\""
        )
