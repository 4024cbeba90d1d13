"""Fetch the MiniLLM-format evaluation sets that eval.py reads (and Dolly's dev split) from their public
source.

    python fetch_data.py                       # into ../shared/data, eval.py's default --data-dir
    python fetch_data.py --out data            # anywhere else: pass --data-dir data to eval.py / repro.py
    python fetch_data.py --sets dolly,vicuna   # a subset

Every file is downloaded to a temporary name beside its destination, checked (byte count, row count and
sha256 where they are known; every line a JSON object with `prompt` and `output`) and only then renamed into
place. Existing files are kept unless --overwrite. Standard library only: it runs before anything else is
installed. Errors are one line, `error: ...`, exit code 2.

Source: the MiniLLM-processed files (Gu et al., MiniLLM; microsoft/LMOps) as published, byte-identical, in
github.com/sonho4ng/SRAv2 under llm-data/ at the commit below (also in MrQinlala/Distill_DTKD). The contents
keep the licences of the original datasets: Dolly CC BY-SA 3.0, Self-Instruct Apache-2.0, Vicuna questions
(FastChat) Apache-2.0, Super-NaturalInstructions Apache-2.0, Unnatural Instructions MIT.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SOURCE = "https://raw.githubusercontent.com/sonho4ng/SRAv2/d7c7263c15d7d9db67eb956ed113381755c6a3c1/llm-data"
# eval.py's and repro.py's --data-dir
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "shared" / "data"


@dataclass(frozen=True)
class Remote:
    name: str                  # set name (eval.py's SETS, plus dolly-dev)
    path: str                  # relative path, the same under --source and under --out
    size: int | None = None    # bytes, None where unknown
    rows: int | None = None
    sha256: str | None = None


FILES = [
    Remote("dolly", "dolly/valid.jsonl", 505929, 500,
           "f2624572fdde0bec8759e63fecefdc5e38679816464cd57ef563612ccc6acc06"),
    Remote("dolly-dev", "dolly/dev.jsonl", 929603, 1000,
           "a16927bf54fa96c945f267db083520301b751bdbab23c5f55f4482950bcb4f6c"),
    Remote("self-inst", "self-inst/valid.jsonl", 237036, 242,
           "18922e8ac8a6034ecf0ec8026e24473a30297aaa2e7182d6beb56682586af525"),
    Remote("vicuna", "vicuna/valid.jsonl", 131846, 80,
           "04f5fabc7e2660a778ef86f7d2779f69a8f108b892074517566b7d714a269c3a"),
    Remote("sinst", "sinst/11_/valid.jsonl", 2259371, 1694,
           "8c62f31543f02f3dc44ceb62436ec633ab7add9a94307a7dd1977f90378576a6"),
    # UnNI "11_" (MiniLLM: 10,000 rows, responses of 11 tokens or more). About 7 MB; no checksum is
    # recorded for it, so only its format is checked.
    Remote("uinst", "uinst/11_/valid.jsonl"),
]


class FetchError(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="data folder to fill (eval.py's --data-dir)")
    p.add_argument("--source", default=SOURCE,
                   help="base URL holding the files at the same relative paths (https://, http://, file://, "
                        "or a local folder)")
    p.add_argument("--sets", default=",".join(f.name for f in FILES),
                   help="comma-separated sets to fetch")
    p.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a download fails")
    args = p.parse_args(argv)
    known = [f.name for f in FILES]
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in args.sets if s not in known]
    if unknown or not args.sets:
        raise FetchError(f"--sets: unknown set(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(known)}")
    if args.timeout <= 0:
        raise FetchError(f"--timeout must be > 0, got {args.timeout}")
    if "://" not in args.source:  # a local folder
        args.source = Path(args.source).resolve().as_uri()
    return args


def check_rows(data_lines: list[bytes], remote: Remote, url: str) -> None:
    """Check that every line is a JSON object with the MiniLLM fields eval.py reads.
    An LFS pointer or an HTML page fails."""
    if data_lines and data_lines[0].startswith(b"version https://git-lfs"):
        raise FetchError(f"set {remote.name}: {url} is a Git LFS pointer, not the data")
    for i, line in enumerate(data_lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise FetchError(f"set {remote.name}: {url} line {i} is not JSON "
                             "(not a MiniLLM-format file)") from None
        if not isinstance(row, dict) or "prompt" not in row or "output" not in row:
            raise FetchError(f"set {remote.name}: {url} line {i} lacks the MiniLLM fields prompt and output")
    if not data_lines:
        raise FetchError(f"set {remote.name}: {url} is empty")


def download(url: str, tmp: Path, timeout: float, remote: Remote) -> bytes:
    """Stream url into tmp (created with the user's umask); returns the content for the checks."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = bytearray()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    data += chunk
                f.flush()
                os.fsync(f.fileno())
    except urllib.error.HTTPError as e:
        raise FetchError(f"set {remote.name}: download of {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        hint = "" if url.startswith("file:") else "; offline?"
        raise FetchError(f"set {remote.name}: cannot reach {url} ({e.reason}{hint})") from None
    except (OSError, ValueError) as e:  # timeouts, resets, a malformed URL
        raise FetchError(f"set {remote.name}: download of {url} failed: {e}") from None
    return bytes(data)


def verify(data: bytes, remote: Remote, url: str) -> None:
    if remote.size is not None and len(data) != remote.size:
        raise FetchError(f"set {remote.name}: {url} has {len(data)} bytes, expected {remote.size}")
    lines = data.splitlines()
    if remote.rows is not None and len(lines) != remote.rows:
        raise FetchError(f"set {remote.name}: {url} has {len(lines)} rows, expected {remote.rows}")
    if remote.sha256 is not None and hashlib.sha256(data).hexdigest() != remote.sha256:
        raise FetchError(f"set {remote.name}: {url} sha256 {hashlib.sha256(data).hexdigest()} "
                         f"differs from the expected {remote.sha256}")
    check_rows(lines, remote, url)


def fetch(remote: Remote, source: str, out: Path, *, overwrite: bool, timeout: float) -> str:
    dest = out / remote.path
    url = source.rstrip("/") + "/" + remote.path
    if dest.exists() and not overwrite:
        return f"{remote.name}: {dest} exists, kept (--overwrite replaces it)"
    if dest.exists() and not dest.is_file():
        raise FetchError(f"set {remote.name}: {dest} exists and is not a file")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"--out {out}: cannot create {dest.parent}: {e.strerror}") from None
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        verify(download(url, tmp, timeout, remote), remote, url)
        os.replace(tmp, dest)
    except OSError as e:
        raise FetchError(f"set {remote.name}: cannot write {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return f"{remote.name}: {dest} ({dest.stat().st_size} bytes) from {url}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = Path(args.out)
        for remote in (f for f in FILES if f.name in args.sets):
            print(fetch(remote, args.source, out, overwrite=args.overwrite, timeout=args.timeout), flush=True)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (files already fetched are complete; a rerun keeps them)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
