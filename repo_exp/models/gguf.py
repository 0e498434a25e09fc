"""A GGUF file as an ordinary transformers folder: ``python -m repo_exp.models.gguf SRC.gguf OUT_DIR``.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package): it dequantises
every tensor to floating point as it loads, and converts the tokenizer (its chat template included). It refuses to
save such a model (a "gguf-quantised" model is not serialisable), so the conversion builds the same architecture from
the loaded config without its quantisation entry, takes the loaded state dict (every key must match), checks that
both give the same logits, and writes safetensors, the tokenizer and ``generation_config.json``.

The weights are those of the quantised file, dequantised: a 4-bit file (Q4_0, Q4_1, ...) converts to float32 weights
that hold only the 4-bit values; fine-tuning starts from that model, not from the original full-precision one.

``model.source=gguf`` (``conf/model/smollm2_135m.yaml``) converts its ``model.path`` once into the cache
(``world.cache_dir``/gguf/<name>-<sha256 prefix>) and loads the folder. ``gguf_source.json``, written last, records
the source file, its SHA-256, its quantisation, the revision it was converted under (``model.revision``: for a file
shipped in a Python package, that package's pinned version, ``distribution==version``) and the size of every file
written, so that a folder cut by an interrupted copy is converted again rather than trusted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from repo_exp.checkpoint import sha256_of

log = logging.getLogger(__name__)

SOURCE_RECORD = "gguf_source.json"  # written last: a folder without it is an unfinished conversion


class GGUFError(ValueError):
    """A GGUF file that transformers cannot read, or whose conversion does not reproduce it."""


def quantization_of(path: Path) -> str | None:
    """The file type a GGUF file records (``MOSTLY_Q4_1``, ``ALL_F32``, ...), None when it records none."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return None
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)


def _read(src: Path, key: str):
    """The tokenizer and the dequantised model transformers reads from ``src``; a ``GGUFError`` naming ``key`` and the
    file when it cannot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers and gguf raise many kinds; all mean "cannot read it"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GGUFError(f"{key}={src}: transformers cannot read this GGUF file ({type(exc).__name__}: {reason}); "
                        f"give a GGUF file of an architecture transformers loads (Llama, Mistral, Qwen2, ...)") from exc
    return tokenizer, model


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture as the GGUF-loaded ``model``, built from its config without the quantisation entry, with
    its weights: a model ``save_pretrained`` writes. Every key must match."""
    from transformers.initialization import no_init_weights

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise GGUFError(f"the dequantised weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


@torch.no_grad()
def check_same_logits(a: torch.nn.Module, b: torch.nn.Module, vocab: int) -> float:
    """The largest logit difference of ``a`` and ``b`` on a fixed token sequence; a ``GGUFError`` if they differ."""
    ids = torch.arange(1, 17).remainder(vocab).unsqueeze(0)
    gap = float((a.eval()(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())
    if gap > 1e-5:
        raise GGUFError(f"the converted model's logits differ from the GGUF-loaded model's by {gap:g}")
    return gap


def convert(src: str | os.PathLike, out: str | os.PathLike, revision: str | None = None,
            key: str = "model.path") -> Path:
    """Convert the GGUF file ``src`` into the transformers folder ``out`` (written beside it under a temporary name,
    then renamed into place; an existing ``out`` is refused). ``revision`` is recorded as the folder's revision."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise GGUFError(f"{key}={src}: no such file (a GGUF file is expected)")
    if out.exists():
        raise GGUFError(f"{out} exists already; convert into a new folder (nothing was written)")
    tokenizer, quantized = _read(src, key)
    plain = plain_copy(quantized)
    gap = check_same_logits(quantized, plain, plain.config.vocab_size)
    del quantized
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)  # config, safetensors, generation_config.json
        tokenizer.save_pretrained(tmp)
        record = {
            "source": str(src.resolve()), "file": src.name, "size": src.stat().st_size, "sha256": sha256_of(src),
            "quantization": quantization_of(src), "revision": revision, "max_logit_gap": gap,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s (%s) into %s", src, record["quantization"], out)
    return out


def converted_problem(folder: Path, revision: str | None) -> str | None:
    """None when ``folder`` is a finished conversion under ``revision`` whose files have their recorded sizes, else
    what is wrong with it."""
    record_path = folder / SOURCE_RECORD
    if not record_path.is_file():
        return f"no {SOURCE_RECORD} (the conversion did not finish)"
    try:
        record = json.loads(record_path.read_text())
    except ValueError as exc:
        return f"unreadable {SOURCE_RECORD} ({exc})"
    if record.get("revision") != revision:
        return f"converted under revision {record.get('revision')!r}, this run pins {revision!r}"
    for name, size in (record.get("files") or {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or not {size} bytes (an interrupted copy?)"
    return None


def converted_folder(src: str | os.PathLike, revision: str | None, cache_dir: str | os.PathLike,
                     key: str = "model.path") -> Path:
    """The transformers folder of the GGUF file ``src`` in ``cache_dir``/gguf, converted on first use (under a file
    lock: concurrent runs and ranks convert once). A folder whose record does not verify is converted again; it is
    the cache's own."""
    from filelock import FileLock

    from repo_exp.revisions import check_package_pin

    src = Path(src).expanduser()
    if not src.is_file():
        raise GGUFError(f"{key}={src}: no such file (a GGUF file is expected)")
    check_package_pin(f"{key}={src}", revision)
    folder = Path(cache_dir).expanduser() / "gguf" / f"{src.stem}-{sha256_of(src)[:16]}"
    if converted_problem(folder, revision) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        problem = converted_problem(folder, revision)
        if problem is None:  # another process converted it meanwhile
            return folder
        if folder.exists():
            log.warning("converting %s again: the cached folder %s has %s", src, folder, problem)
            shutil.rmtree(folder)
        log.info("converting %s into %s (once; the weights are dequantised to float32)", src, folder)
        return convert(src, folder, revision, key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repo_exp.models.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a GGUF file transformers can read")
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--revision", default=None,
                        help="recorded as the folder's revision (e.g. the version of the package that ships the file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert(args.src, args.out, args.revision, key="src")
    except GGUFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
