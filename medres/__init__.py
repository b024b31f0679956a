"""medres: transfer learning for chest X-rays. Research use only — not for diagnosis."""

__version__ = "0.1.0"

MIN_TORCH = (2, 10)


def _check_torch_version(version: str | None = None) -> None:
    """Refuse torch < 2.10: older releases have `weights_only` bypass CVEs.

    Reads the installed version from package metadata, so importing medres stays cheap.
    """
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("torch")
        except PackageNotFoundError:
            return  # torch-free use (e.g. ingestion only); model code will fail on import
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_TORCH:
        raise ImportError(
            f"medres needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (found {version}): older torch "
            "can execute code from checkpoint files despite weights_only=True. "
            "Install it with: pip install 'torch==2.13.0'"
        )


_check_torch_version()
