"""Files of moekd: loading and saving models (local or hub, safetensors out, no remote code, .bin only with
torch's weights-only unpickler), run folders (an overwrite guard that deletes only what moekd wrote),
atomic checkpoints, strict JSON. The one-line errors of every command (MoekdError, run_cli) live in
errors.py; the Llama-MoE model port in llama_moe.py, which imports nothing from here.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from errors import MoekdError, RunStopped
from llama_moe import build_llama_moe, check_llama_moe_config, save_llama_moe


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


def local_model_dir(name_or_path: str, *, what: str = "--model") -> Path:
    """A local directory with config.json: the path itself, or a hub snapshot (config + weights)."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoekdError(f"{what} {name_or_path}: directory has no config.json")
        return refuse_remote_code(path, what)
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"], ignore_patterns=["*.pth"]))
    except Exception as e:
        raise MoekdError(f"{what} {name_or_path}: not a local directory and not loadable from the hub "
                         f"({type(e).__name__})") from None
    return refuse_remote_code(path, what)


def refuse_remote_code(directory: Path, what: str) -> Path:
    """A model whose config.json or tokenizer_config.json has an `auto_map` needs its own Python code:
    an error before transformers sees it (which would ask whether to run it), so that code is never
    imported."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            raw = json.loads((directory / name).read_text()) if (directory / name).is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoekdError(f"{directory / name}: malformed JSON ({e})") from None
        if name == "config.json" and not isinstance(raw, dict):
            raise MoekdError(f"{directory / name}: expected a JSON object, got {type(raw).__name__}")
        if isinstance(raw, dict) and "auto_map" in raw:
            raise MoekdError(f"{what} {directory}: {name} has an auto_map, the model needs remote code, "
                             f"which moekd never runs")
    return directory


def load_tensors_only(path: Path, hint: str = "", **kw) -> dict:
    """torch.load with the weights-only unpickler.
    A pickle holding anything else is refused, never run; a truncated or damaged file is a one-line error
    naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError:
        raise MoekdError(f"{path}: refused, it pickles objects other than tensors{hint}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise MoekdError(f"{path}: unreadable, truncated or damaged ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def weight_shards(directory: Path) -> list[Path]:
    """The weight files of a model folder: the single file, or the shards its index names.
    A shard name that resolves outside the folder (`../`, an absolute path, a link) is refused: a model
    folder is read as a unit and must not pull weights from elsewhere."""
    for name in WEIGHT_FILES:
        if (directory / name).exists():
            break
    else:
        raise MoekdError(f"{directory}: no weights ({' / '.join(WEIGHT_FILES)})")
    if not name.endswith(".index.json"):
        return [directory / name]
    index = directory / name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise MoekdError(f"{index}: not a weight index with a weight_map of file names "
                         f"({first_line(e)})") from None
    root, shards = directory.resolve(), []
    for shard in names:
        path = (directory / str(shard)).resolve()
        inside = isinstance(shard, str) and not os.path.isabs(shard) and path.is_relative_to(root)
        if not inside or path == root:
            raise MoekdError(f"{index}: shard {shard!r} lies outside {directory}; refused")
        if not path.is_file():
            raise MoekdError(f"{index}: shard {shard} does not exist")
        shards.append(directory / shard)
    return shards


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated, damaged or other kind of file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise MoekdError(f"{path}: not a complete safetensors file, truncated or damaged "
                         f"({first_line(e)})") from None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """One weight file's tensors: safetensors, or a .bin through the weights-only unpickler."""
    if path.name.endswith(".safetensors"):
        return read_safetensors(path)
    return load_tensors_only(path, "; convert it to safetensors", mmap=True)


def check_weight_files(directory: Path) -> dict[str, tuple[Path, tuple]]:
    """Open every weight file before a model is built from it; returns key -> (file, shape).
    A truncated safetensors file, a .bin that pickles code, a shard outside the folder are one-line errors
    here, not tracebacks deep in a loader."""
    shapes = {}
    for path in weight_shards(directory):
        if path.name.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(path, "pt") as f:
                    shapes.update({k: (path, tuple(f.get_slice(k).get_shape())) for k in f.keys()})
            except (SafetensorError, OSError) as e:
                raise MoekdError(f"{path}: not a complete safetensors file, truncated or damaged "
                                 f"({first_line(e)})") from None
        else:
            shapes.update({k: (path, tuple(t.shape)) for k, t in read_shard(path).items()})
    return shapes


def read_state_dict_files(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a checkpoint, one shard in memory at a time."""
    for shard in weight_shards(directory):
        tensors = read_shard(shard)
        yield from tensors.items()
        del tensors


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse weights with NaN or inf, naming the tensor.
    They make every output NaN: an error at load, not a wrong diagnosis (or a sampling crash) later."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise MoekdError(f"{what}: weight {name} holds {bad} non-finite value(s) (NaN/inf) of "
                             f"{p.numel()}; the model's weights are damaged")


def check_shapes(directory: Path, config, shapes: dict[str, tuple[Path, tuple]], what: str) -> None:
    """Check the weight files' shapes against the model config.json describes (built on the meta device).
    A mismatch (a vocab_size edited, another model's weights) names the key instead of transformers' load
    report and traceback."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in
                    AutoModelForCausalLM.from_config(config, trust_remote_code=False).state_dict().items()}
    for key, want in expected.items():
        path, shape = shapes.get(key, (None, want))
        if shape != want:
            raise MoekdError(f"{what}: {key} has shape {shape} in {path.name}, {directory / 'config.json'} "
                             f"gives {want}")


def load_state_dict_strict(model: nn.Module, pairs: Iterator[tuple[str, torch.Tensor]], *, where: str,
                           partial: bool = False) -> None:
    """Copy every checkpoint tensor into the model.
    Missing (unless `partial`), unexpected or mis-shaped keys are errors. Stray `rotary_emb.inv_freq`
    buffers of older checkpoints are ignored (recomputed)."""
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for key, tensor in pairs:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if key not in params:
                raise MoekdError(f"{where}: unexpected checkpoint key {key}")
            if params[key].shape != tensor.shape:
                raise MoekdError(f"{where}: {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                                 f"model expects {tuple(params[key].shape)}")
            params[key].copy_(tensor)
            seen.add(key)
    missing = sorted(set(params) - seen)
    if missing and not partial:
        raise MoekdError(f"{where}: checkpoint is missing {len(missing)} key(s), e.g. {missing[0]}")


def has_weights(directory: Path) -> bool:
    return any((directory / name).exists() for name in WEIGHT_FILES)


def load_model(name_or_path: str, *, device: torch.device | str = "cpu", dtype=torch.float32,
               what: str = "--model") -> nn.Module:
    """A causal LM in eval mode: Llama-MoE natively (no remote code), anything else via AutoModelForCausalLM.
    A local config-only folder with `moekd_init_seed` (tiny_moe/) is initialised from that seed; a saved
    model's folder without its weights is an error, never random weights."""
    directory = local_model_dir(name_or_path, what=what)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"{directory / 'config.json'}: malformed JSON ({e})") from None
    if not isinstance(raw, dict):
        raise MoekdError(f"{directory / 'config.json'}: expected a JSON object, got {type(raw).__name__}")
    init_seed = None if has_weights(directory) else seeded(raw)
    if not has_weights(directory) and init_seed is None:
        saved = " (its config.json was saved with weights, which are gone)" \
            if "transformers_version" in raw else ""
        raise MoekdError(f"{what} {name_or_path}: no weights ({' / '.join(WEIGHT_FILES)}){saved}")
    shapes = check_weight_files(directory) if init_seed is None else {}
    if init_seed is not None:
        print(f"{what} {name_or_path}: no weights, initialising from moekd_init_seed={init_seed}")
    if raw.get("model_type") == "llama_moe":  # moekd's own port, llama_moe.py: no remote code
        model = load_llama_moe(directory, raw, device=device, dtype=dtype, init_seed=init_seed)
        check_finite_weights(model, f"{what} {name_or_path}")
        return model
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        if init_seed is not None:
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        else:
            check_shapes(directory, config, shapes, f"{what} {name_or_path}")
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
        if isinstance(e, MoekdError):
            raise
        raise MoekdError(f"{what} {name_or_path}: transformers cannot load it ({first_line(e)})") from None
    check_finite_weights(model, f"{what} {name_or_path}")
    if torch.device(device).type == "cpu" and type(model)._can_set_experts_implementation():
        model.set_experts_implementation("eager")  # torch's CPU grouped_mm needs 16-byte-aligned sizes
    return model.to(device).eval()


def load_llama_moe(directory: Path, raw: dict, *, device, dtype, init_seed: int | None) -> nn.Module:
    """A Llama-MoE checkpoint directory (its config.json read as `raw`) in eval mode.
    With `init_seed` and no weights, seeded random weights instead."""
    model = build_llama_moe(check_llama_moe_config(raw, where=str(directory / "config.json")), device=device,
                            dtype=dtype, init_seed=init_seed)
    if init_seed is None:
        load_state_dict_strict(model, read_state_dict_files(directory), where=str(directory))
    return model.eval()


def seeded(raw: dict) -> int | None:
    """The seed of a config-only model folder (tiny_moe/, repro.py's and bench.py's), else None.
    None for a folder save_pretrained wrote (transformers_version): its missing weights are lost, not
    drawn."""
    return None if "transformers_version" in raw else raw.get("moekd_init_seed")


def load_tokenizer(name_or_path: str, *, what: str = "--model"):
    """The model's tokenizer, pad = eos when it has none (as MoEKD for LLaMA)."""
    from transformers import AutoTokenizer
    directory = local_model_dir(name_or_path, what=what)
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json and warns that llama_moe is unknown
    try:
        with warnings.catch_warnings():  # ... and that Llama-MoE's `rope_scaling: null` is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise MoekdError(f"{what} {name_or_path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.eos_token_id is None:
        raise MoekdError(f"{what} {name_or_path}: tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab(model: nn.Module, tokenizer, flag: str = "--model") -> None:
    """Every token id must index the model's embeddings (a bigger tokenizer fails deep inside torch)."""
    size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > size:
        raise MoekdError(f"{flag}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocabulary of {size}")


def save_model(model: nn.Module, tokenizer, directory: Path, *, max_shard_bytes: int = 5 * 2**30,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained-style output in `directory` (safetensors); load_model reads it back.
    `state_dict`: the weights to write instead of the model's own (a sharded model's gathered copy)."""
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if hasattr(model, "moe_config"):
        return save_llama_moe(model, directory, state_dict=state_dict, max_shard_bytes=max_shard_bytes)
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per checkpoint of a tiny model is noise
    try:
        model.save_pretrained(directory, state_dict=state_dict)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    config = directory / "config.json"  # a saved model is never a seeded config-only folder again
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k != "moekd_init_seed"}, indent=2, sort_keys=True) + "\n")


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Permissions as plain open()/mkdir() give them (mkdtemp makes 0700 folders, safetensors 0600 files)."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomically(directory: Path, write) -> None:
    """write(tmp_dir), then swap it into place: a crash never leaves a half-written `directory`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as e:
        full = isinstance(e, Exception) and (isinstance(e, OSError) and e.errno == errno.ENOSPC
                                             or disk_full(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # torch.save says "unexpected pos ..." on a full disk, safetensors its own error
            raise RunStopped(f"no space left on device writing {directory}") from None
        if isinstance(e, OSError):
            raise output_error(e, directory) from None
        raise


def disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN/inf refused), written to a temporary file and renamed into place."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise MoekdError(f"{path}: refusing to write a non-finite number (NaN/inf) into JSON") from None
    replace_file(path, lambda tmp: tmp.write_text(text))


def replace_file(path: Path, write) -> None:
    """write(tmp) to a temporary file beside `path`, then rename it into place: never half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    with writing(path, tmp):
        write(tmp)
        os.replace(tmp, path)


def output_error(e: OSError, path: Path) -> RunStopped:
    """An OSError of a write as one line naming the file (a failed write() carries no file name)."""
    why = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system"}.get(e.errno, (e.strerror or type(e).__name__).lower())
    return RunStopped(f"{why} writing {path}")


@contextlib.contextmanager
def writing(path: Path, *partial: Path):
    """Around every output write: an OSError becomes a one-line error naming `path`.
    Full disk, read-only file system, ...; the `partial` files it leaves (temporary files) are removed."""
    try:
        yield
    except OSError as e:
        for leftover in partial:
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise output_error(e, path) from None


def append_line(path: Path, line: str) -> None:
    """One log line appended whole or not at all: a failed write is cut back to the old end."""
    with writing(path):
        with path.open("a") as f:
            end = f.tell()
            try:
                f.write(line + "\n")
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(end)
                raise


ROUTERS_FILE = "teacher_routers.safetensors"


def save_run_model(directory: Path, model, tokenizer, routers: dict[str, torch.Tensor] | None, *,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a student directory that load_model reads; SAR runs add the trained teacher routers beside it.
    `state_dict`: a sharded student's gathered weights."""
    save_model(model, tokenizer, directory, state_dict=state_dict)
    if routers is not None:
        from safetensors.torch import save_file
        save_file(routers, directory / ROUTERS_FILE)


def save_checkpoint(out: Path, step: int, model, tokenizer, weights, routers, state: dict) -> None:
    """checkpoints/step-N (model, routers, trainer state), then the `latest` pointer, both atomic.
    No RNG state: every random draw of a step is seeded from (seed, step, micro-batch)."""
    ckpt_root = out / "checkpoints"
    with writing(ckpt_root):
        ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step}"
    def write(tmp: Path) -> None:
        save_run_model(tmp, model, tokenizer, routers, state_dict=weights)
        torch.save({"step": step, **state}, tmp / "trainer_state.pt")
    write_atomically(ckpt_root / name, write)
    pointer = ckpt_root / "latest.tmp"
    with writing(ckpt_root / "latest", pointer):
        pointer.write_text(name + "\n")
        os.replace(pointer, ckpt_root / "latest")
    for old in ckpt_root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old)


def truncate_log(path: Path, step: int) -> None:
    """Drop what a killed run logged after its checkpoint, so a resume from step N logs on after N.
    Step and dev lines of later steps, and a half-written last line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.endswith("\n") and not (
        (m := re.match(r"(?:dev )?step (\d+)", line)) and int(m.group(1)) > step)]
    if keep != lines:
        tmp = path.with_name(f".tmp-{path.name}")
        with writing(path, tmp):
            tmp.write_text("".join(keep))
            os.replace(tmp, path)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names (None without one).
    It must be a step-N folder beside it, so an edited pointer can never resume from another run's (or any
    other) folder."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text(errors="replace").strip()
    ckpt = out / "checkpoints" / name
    if not re.fullmatch(r"step-\d+", name) or ckpt.is_symlink() or not ckpt.is_dir():
        raise MoekdError(f"{pointer}: names {name[:300]!r}, not a checkpoint of this run (a step-N folder in "
                         f"{out / 'checkpoints'}); refused")
    return ckpt


LOCK = ".lock"
MKDTEMP = r"[a-z0-9_]{8}"  # tempfile.mkdtemp's random part (write_atomically)
# Every name moekd.py writes in a run folder, temporary ones included (write_json, truncate_log,
# write_atomically), and in its checkpoints/ folder.
RUN_NAMES = re.compile(rf"run\.json|log\.txt|metrics\.json|training\.png|checkpoints|best_rougeL|final"
                       rf"|\{LOCK}"
                       rf"|\.tmp-(run\.json|metrics\.json|log\.txt|training\.png)"
                       rf"|\.tmp-(best_rougeL|final)-{MKDTEMP}|\.old-(best_rougeL|final)-\d+")
CHECKPOINT_NAMES = re.compile(rf"step-\d+|latest|latest\.tmp|\.tmp-step-\d+-{MKDTEMP}|\.old-step-\d+-\d+")


def check_own_folder(out: Path, marker: str, names: re.Pattern, inner: dict[str, re.Pattern],
                     marker_keys: set[str], required: set[str]) -> None:
    """Check that --overwrite removes only a folder moekd wrote, judged by content.
    Every name is one moekd writes (`names`; in the subfolders of `inner`, theirs), and the marker a JSON
    object with moekd's keys (`required` present, nothing outside `marker_keys`). A folder holding only a
    killed run's leftovers (the lock, temporary files) needs no marker."""
    entries = sorted(p.name for p in out.iterdir())
    foreign = [n for n in entries if not names.fullmatch(n)]
    for sub, pattern in inner.items():
        if (out / sub).is_dir() and not (out / sub).is_symlink():
            foreign += [f"{sub}/{p.name}" for p in sorted((out / sub).iterdir())
                        if not pattern.fullmatch(p.name)]
        elif (out / sub).exists():
            foreign.append(sub)
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise MoekdError(f"--out {out}: holds files moekd did not write ({', '.join(foreign[:10])}{more}); "
                         f"--overwrite refuses to delete it")
    if all(n == LOCK or n.startswith((".tmp-", ".old-")) or n == "latest.tmp" for n in entries):
        return  # a run stopped before its marker was written: nothing but moekd's own leftovers
    if marker not in entries:
        raise MoekdError(f"--out {out}: has no {marker}, not a moekd output folder; --overwrite refuses to "
                         f"delete it")
    try:
        saved = json.loads((out / marker).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not required <= set(saved) or set(saved) - marker_keys:
        raise MoekdError(f"--out {out}: its {marker} is not one moekd wrote (another tool's folder?); "
                         f"--overwrite refuses to delete it")


def clear_folder(out: Path) -> None:
    """Delete what is in `out` (checked by check_own_folder), keeping the folder itself (`--out .`)
    and the lock this process holds in it."""
    for p in out.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def busy(out: Path) -> bool:
    """`out` holds something besides the lock a finished or killed run leaves."""
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


def check_out_apart(out: Path, reads: dict[str, str | list[str] | None]) -> None:
    """--out may not be, contain or lie inside a local path the run reads (model, teacher, data files):
    --overwrite would delete the input (a teacher loaded from runs/T/best with --out runs/T)."""
    where = out.resolve()
    for flag, value in ((f, v) for f, vs in reads.items() for v in (vs if isinstance(vs, list) else [vs])):
        if not value or not Path(value).exists():
            continue  # unset, or a hub name
        path = Path(value).resolve()
        how = "is" if path == where else "contains" if path.is_relative_to(where) else \
            "lies inside" if where.is_relative_to(path) else None
        if how:
            raise MoekdError(f"--out {out}: {how} {flag} {value}, which this run reads; pick another --out")


def check_writable(out: Path, flag: str = "--out") -> None:
    """Before any model loads: `out` (or the folder it will be made in) must be writable.
    So a read-only disk is one line now, not a traceback after minutes of loading."""
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    base = base if base.exists() else Path(".")
    if os.access(base, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
    where = f"{out}" if base == out else f"{out}: its folder {base}"
    raise MoekdError(f"{flag} {where} {why}; pick another {flag}")


class RunLock:
    """An exclusive flock on `out/.lock`: one moekd process per folder, released when the process dies.
    Two runs, or a run and an evaluation, would interleave their files; a killed run never leaves a stale
    lock. The pid and host inside are only for the message."""

    def __init__(self, active: bool = True):
        self.active, self.fd, self.out = active, None, None

    def acquire(self, out: Path) -> None:
        if not self.active or self.fd is not None:
            return
        path = out / LOCK
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MoekdError(f"--out {out}: another moekd process is using it ({holder}); wait for it to end "
                             f"or pick another --out") from None
        except OSError as e:
            os.close(fd)
            raise MoekdError(f"--out {out}: cannot lock {path} ({e.strerror})") from None
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd, self.out = fd, out

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def default_out(method: str, model: str) -> str:
    return str(Path("runs") / f"{method}-{Path(model.rstrip('/')).name}")


def saved_config(values: dict, given: dict, fields: dict) -> dict:
    """The config of the run a --resume continues (its run.json).
    Every explicit flag that differs from it, other than RESUME_MAY_CHANGE, is listed in one error.
    `fields`: the config's field defaults."""
    out = Path(values.get("out")
               or default_out(values.get("method", "sft"), values.get("model", fields["model"])))
    if not (out / "run.json").is_file():
        raise MoekdError(f"--out {out}: no run.json, not a moekd run to resume")
    try:
        saved = json.loads((out / "run.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"{out / 'run.json'}: unreadable ({e})") from None
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # one process shards nothing
    once = {"stop_after", "resume", "overwrite"} | ({"shard_teacher", "shard_student"} if single else set())
    saved = {k: v for k, v in saved.items() if k in fields and k not in once}  # `once`: this invocation's own
    if saved.get("global_batch_size") is not None and "grad_accum" not in given:
        saved["grad_accum"] = None  # split_global_batch() derives it for this launch's device count
    differ = [f"--{k.replace('_', '-')} {v!r} (run: {saved.get(k, fields[k])!r})" for k, v in given.items()
              if k not in RESUME_MAY_CHANGE and v != saved.get(k, fields[k])]
    if differ:
        raise MoekdError(f"--resume: {'; '.join(differ)} differ from the run being resumed; --resume "
                         f"continues with the run's config (run.json), pass only flags that may change")
    return {**saved, "out": str(out)}


# Flags a --resume may change. The device count and its split (batch size, accumulation) may change
# too, as long as the global batch stays the same.
RESUME_MAY_CHANGE = {"resume", "stop_after", "device", "teacher_device", "dtype", "log_every", "out", "tiny",
                     "sampler", "dist_timeout", "batch_size", "grad_accum", "global_batch_size",
                     "shard_teacher", "shard_student"}


def check_resume_config(cfg, saved: dict, world: int) -> None:
    """The other flags were checked by saved_config(); the device split may change, the global batch not."""
    was = saved["batch_size"] * saved.get("world_size", 1) * saved["grad_accum"]
    now = cfg.batch_size * world * cfg.grad_accum
    if now != was:
        raise MoekdError(f"global batch {now} ({cfg.batch_size} x {world} device(s) x {cfg.grad_accum}) "
                         f"differs from the run being resumed ({was}); change --batch-size/--grad-accum to "
                         f"keep it")


def prepare_out_dir(cfg, *, reads: dict[str, str | None] | None = None, lock: RunLock | None = None,
                    fields: set[str] = frozenset()) -> tuple[Path, dict | None]:
    """Check --out before any work; returns it and, on --resume, the checkpoint's trainer state.
    Apart from the inputs, writable, never touching an existing run unless --resume/--overwrite, and
    --overwrite only a moekd run (`fields`: run.json's keys). An existing folder is locked here (rank 0:
    `lock`), a new one when start_out_dir makes it."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MoekdError(f"--out {out}: exists and is not a directory")
    check_out_apart(out, reads or {})
    check_writable(out)
    if cfg.resume:
        ckpt = latest_checkpoint(out) if busy(out) else None
        if ckpt is None:
            raise MoekdError(f"--out {out}: no checkpoint to resume from")
        if lock is not None:  # a folder is locked once it is known to be ours: nothing is written elsewhere
            lock.acquire(out)
        return out, load_tensors_only(ckpt / "trainer_state.pt")
    if busy(out) and not cfg.overwrite:
        raise MoekdError(f"--out {out}: exists and is not empty; pass --resume or --overwrite")
    if busy(out):
        check_own_folder(out, "run.json", RUN_NAMES, {"checkpoints": CHECKPOINT_NAMES},
                         fields | {"world_size"}, {"method", "model", "out", "seed"})
        if lock is not None:
            lock.acquire(out)
    return out, None


def start_out_dir(out: Path, overwrite: bool, lock: RunLock | None) -> None:
    """Rank 0, once the inputs loaded: empty (--overwrite) or make --out, and hold its lock.
    A folder another process filled meanwhile is refused."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire(out)
    if overwrite:
        clear_folder(out)
    elif busy(out):
        raise MoekdError(f"--out {out}: exists and is not empty; pass --resume or --overwrite")


def stop_message(e: BaseException, out: Path) -> str:
    """A stopped run's one line: why, then where to go on from (the last checkpoint, or starting over)."""
    try:
        ckpt = latest_checkpoint(out)
    except MoekdError:
        ckpt = None
    why = str(e) if isinstance(e, RunStopped) else str(output_error(e, Path(e.filename or "(unknown file)")))
    where = f"its last good checkpoint is {ckpt} (continue with --resume)" if ckpt else \
        "no checkpoint was saved yet: start over with the same command and --overwrite"
    return f"{why}; the run stopped, {where}"
