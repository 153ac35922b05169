"""The CUDA library check behind ``voicebot doctor``, on a machine without a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from voicebot import cuda
from voicebot.doctor import cuda_libraries_check


def _refuse(name: str) -> object:
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


def test_missing_libraries_are_named_with_the_fix() -> None:
    check = cuda_libraries_check(_refuse)
    assert not check.ok
    assert check.name == "CUDA libraries"
    for text in ("cuBLAS 12", "libcublas.so.12", "cuDNN 9", "libcudnn.so.9"):
        assert text in check.detail
    assert "pip install 'voicebot[gpu]'" in check.detail
    assert "nvidia-cublas-cu12 nvidia-cudnn-cu12" in check.detail  # each wheel once


def test_only_the_missing_one_is_named() -> None:
    def no_cudnn(name: str) -> object:
        if "cudnn" in name:
            raise OSError(name)
        return object()

    check = cuda_libraries_check(no_cudnn)
    assert not check.ok
    assert "cuDNN 9" in check.detail and "cuBLAS" not in check.detail
    assert "nvidia-cudnn-cu12" in check.detail and "nvidia-cublas-cu12" not in check.detail


def test_all_present() -> None:
    check = cuda_libraries_check(lambda name: object())
    assert check.ok and "cuBLAS 12" in check.detail


def test_this_machine_without_the_gpu_extra() -> None:
    # No CUDA here and the [gpu] wheels are not installed: the real loader finds nothing.
    if any(cuda.wheel_path(library) for library in cuda.REQUIRED):
        pytest.skip("the [gpu] extra is installed here")
    names = {library.soname for library in cuda.missing()}
    assert "libcublas.so.12" in names and "libcudnn.so.9" in names


def test_preload_loads_the_wheel_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lib = tmp_path / "nvidia" / "cudnn" / "lib"
    lib.mkdir(parents=True)
    for name in ("libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"):
        (lib / name).write_bytes(b"")
    monkeypatch.setattr(
        cuda,
        "wheel_path",
        lambda library: lib / library.soname if "cudnn" in library.soname else None,
    )
    loaded: list[str] = []

    def loader(path: str) -> object:
        # cnn needs ops loaded first, as cuDNN's sub-libraries do.
        if path.endswith("cnn.so.9") and not any(p.endswith("ops.so.9") for p in loaded):
            raise OSError("libcudnn_ops.so.9: not found")
        loaded.append(path)
        return object()

    caplog.set_level(logging.INFO, logger="voicebot.cuda")
    cuda.preload(loader)
    assert sorted(Path(p).name for p in loaded) == [
        "libcudnn.so.9",
        "libcudnn_cnn.so.9",
        "libcudnn_ops.so.9",
    ]
    assert not caplog.records

    cuda.preload(_refuse)
    assert len([r for r in caplog.records if "cannot load CUDA library" in r.getMessage()]) == 3


def test_doctor_on_cuda_without_the_libraries_names_them(
    tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path: Path
) -> None:
    """`voicebot doctor --device cuda` as a user runs it, on this machine without CUDA."""
    import subprocess

    from tests.support_voice import free_port, subprocess_env, voicebot_command

    if any(cuda.wheel_path(library) for library in cuda.REQUIRED):
        pytest.skip("the [gpu] extra is installed here")
    proc = subprocess.run(
        [
            *voicebot_command(),
            "doctor",
            "--device",
            "cuda",
            "--stt-model",
            str(tiny_en_model_dir),
            "--tts-voice",
            str(joe_voice_path),
            "--ollama-host",
            f"http://127.0.0.1:{free_port()}",
        ],
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    (line,) = [x for x in proc.stdout.splitlines() if "CUDA libraries" in x]
    assert line.startswith("[MISSING]") and "libcublas.so.12" in line, proc.stdout
    assert "pip install 'voicebot[gpu]'" in line
