"""
Files from the network: download (resume, progress, retries, sha256), the Hugging Face Hub's files
through a local cache (fetch_file, fetch_weights), and the safetensors format their weights come in.

prepare_data.py downloads its texts with download(); tokenizer.py fetches a checkpoint's
tokenizer.json or vocab.txt and pretrained.py its config.json and weights with fetch_file().
Hub files come from $DYNLM_HF_URL (default https://huggingface.co)/<repo>/resolve/main/<file> into
$DYNLM_CACHE (default ~/.cache/dynamic-lm)/hf/<repo>/. Each file's sha256 is checked against the
hub's X-Linked-Etag when it sends one (its LFS files), and is recorded next to the file so that a
reused file is checked too. No safetensors package: the format is simple enough to read here.

Everything downloaded is untrusted: a file name taken from a download (a sharded index's shards)
must stay inside the repo's cache folder, a JSON file that does not parse is deleted so that the next
run fetches it again, and a malformed safetensors header is one line. A checkpoint whose files are
all cached loads without the network: the hub's "no such file" for the optional index is remembered.
"""
import errno
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import requests

from cli import UserError

HF_URL = "https://huggingface.co"


# -----------------------------------------------------------------------------
# download

def check_url(url, name=""):
    """An http:// or https:// address (requests would fail on any other with a traceback)."""
    if not re.match(r"https?://[^/\s]", url):
        raise UserError(f"{name + '=' if name else ''}{url} is not an http:// or https:// address; write it "
                        f"as http://HOST[:PORT]/... or https://...")


def download(url, path, sha256=None, retries=5, local_hint="use a local copy with --input=FILE"):
    """Stream url to path: progress on stderr, resume of a partial file with an HTTP Range request,
    retries with exponential backoff, sha256 check, then rename into place."""
    check_url(url)
    part = path + ".part"
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            with requests.get(url, stream=True, timeout=30,
                              headers={"Range": f"bytes={have}-"} if have else {}) as r:
                if have and r.status_code == 200:  # the server ignored the Range: start over
                    have = 0
                elif r.status_code == 416:  # nothing left to send: the partial file is complete
                    break
                if 400 <= r.status_code < 500:
                    raise UserError(f"HTTP {r.status_code} for {url}; check the address, or {local_hint}")
                r.raise_for_status()
                total = have + int(r.headers.get("Content-Length", 0))
                try:
                    f = open(part, "ab" if have else "wb")
                except OSError as e:  # a read-only or missing folder
                    raise UserError(f"cannot write {part}: {e.strerror}; {local_hint}") from None
                with f:
                    _stream(r, f, have, total, os.path.basename(path))
            break
        except requests.exceptions.InvalidURL as e:  # e.g. a port that is not a number
            raise UserError(f"{url} is not a valid address ({e}); {local_hint}") from None
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise UserError(f"downloading {url} failed {retries} times ({e.__class__.__name__}); check "
                                f"the network and rerun to resume, or {local_hint}") from None
            wait = 2 ** attempt
            print(f"{e.__class__.__name__} while downloading {url}; retrying in {wait}s", file=sys.stderr)
            time.sleep(wait)
    if sha256 is not None:
        digest = file_sha256(part)
        if digest != sha256:
            os.remove(part)
            raise UserError(f"{url} downloaded with sha256 {digest[:12]}..., expected {sha256[:12]}...; "
                            f"the partial file was deleted, rerun to download it again")
    os.replace(part, path)


def _stream(response, f, have, total, label):
    start, last, got = time.time(), 0.0, 0
    try:
        for chunk in response.iter_content(chunk_size=1 << 16):
            try:
                f.write(chunk)
            except OSError as e:
                raise UserError(f"could not write {f.name}: {e.strerror} (is the disk full?); free some "
                                f"space and rerun to resume") from None
            got += len(chunk)
            now = time.time()
            if now - last > 0.5 or (total and have + got >= total):
                last = now
                rate = got / max(now - start, 1e-9) / 2**20
                size = f"{(have + got) / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else f"{(have + got) / 2**20:.1f} MiB"
                print(f"\r{label}: {size} {rate:.1f} MiB/s", end="", file=sys.stderr, flush=True)
    finally:
        print(file=sys.stderr)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the Hugging Face Hub

def cache_root():
    """$DYNLM_CACHE, default ~/.cache/dynamic-lm: hub downloads under hf/, eval.py's under eval/."""
    return os.environ.get("DYNLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dynamic-lm")


def cache_dir(repo):
    return os.path.join(cache_root(), "hf", *repo.split("/"))


def check_repo(repo):
    """OWNER/NAME as the hub allows them (letters, digits, -, _ and ., no ".."): a repo id never names a
    folder outside the cache."""
    if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", repo) or ".." in repo:
        raise UserError(f"hf:{repo} is not a Hugging Face repo id; write it as hf:OWNER/NAME, e.g. hf:Qwen/Qwen2.5-0.5B")


def is_file_name(name):
    """A relative path inside a repo: parts of letters, digits, -, _ and ., none of them "." or ".."
    (file names also come from downloaded files, a sharded index's, and must not leave the cache)."""
    return all(re.fullmatch(r"[\w.-]+", part) and part.strip(".") for part in name.split("/"))


def cached(path):
    """Whether path holds a download whose recorded sha256 still matches (a damaged file is deleted)."""
    record = path + ".sha256"
    if not (os.path.exists(path) and os.path.exists(record)):
        return False
    with open(record) as f:
        expected = f.read().strip()
    if file_sha256(path) == expected:
        return True
    os.remove(path)  # damaged since it was downloaded: fetch it again
    return False


def forget(path):
    """Delete a cached file and its record, so that the next run downloads it again."""
    for p in (path, path + ".sha256"):
        if os.path.exists(p):
            os.remove(p)


def make_cache_folder(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):  # (also true for root on a read-only file system)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise UserError(f"cannot write to the cache folder {folder}: {e.strerror}; set DYNLM_CACHE to a "
                        f"writable folder") from None


def fetch_file(repo, name, required=True):
    """Local path of <repo>/<name>, downloaded on first use; None if the hub has no such file and
    required is False. That answer is remembered in the cache (<name>.absent), so a fully cached
    checkpoint needs no network."""
    check_repo(repo)
    if not is_file_name(name):
        raise UserError(f"{name!r} is not a file name inside hf:{repo}")
    path = os.path.join(cache_dir(repo), *name.split("/"))
    record, absent = path + ".sha256", path + ".absent"
    if cached(path):
        return path
    if not required and os.path.exists(absent):
        return None
    url = f"{hub_url()}/{repo}/resolve/main/{name}"
    status, sha256 = probe(url)
    if status == 404 and not required:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(absent, "w").close()
        except OSError:
            pass  # a read-only cache: the hub is asked again next time
        return None
    if status in (401, 403, 404):
        raise UserError(f"{url}: HTTP {status}; check the repo id (only public repos can be downloaded)")
    make_cache_folder(os.path.dirname(path))
    download(url, path, sha256=sha256, local_hint=f"put the file at {path} and its sha256 in {record}")
    record_sha256(path)
    return path


def record_sha256(path):
    """Write path's sha256 beside it (path.sha256), which cached() checks on every later use."""
    with open(path + ".sha256.tmp", "w") as f:
        f.write(file_sha256(path) + "\n")
    os.replace(path + ".sha256.tmp", path + ".sha256")


def hub_url():
    url = os.environ.get("DYNLM_HF_URL") or HF_URL
    check_url(url, "DYNLM_HF_URL")
    return url.rstrip("/")


def probe(url):
    """(HTTP status, sha256 or None) of url without following the hub's redirect to its CDN: for an
    LFS file the hub answers 302 with the file's sha256 as X-Linked-Etag (ETag on the CDN is not it)."""
    try:
        with requests.get(url, stream=True, allow_redirects=False, timeout=30) as r:
            etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").strip('W/"')
            return r.status_code, etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
    except requests.RequestException:
        return None, None  # download() retries and reports the network problem


def fetch_json(repo, name, required=True):
    """The JSON object in <repo>/<name> (None as fetch_file). A file that is not a JSON object (a
    truncated download: JSON files have no sha256 from the hub) is deleted from the cache, so that the
    next run downloads it again instead of failing on the same copy forever."""
    path = fetch_file(repo, name, required)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        why = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = f"not JSON ({e.__class__.__name__})"
    if why is None:
        return obj
    forget(path)
    raise UserError(f"hf:{repo}'s {name} is {why}; it was deleted from the cache ({path}): rerun to download "
                    f"it again")


INDEX = "model.safetensors.index.json"


def fetch_weights(repo):
    """Paths of the checkpoint's safetensors files: model.safetensors, or the shards its index names.
    A cached model.safetensors is used without asking the hub for an index."""
    check_repo(repo)
    single = os.path.join(cache_dir(repo), "model.safetensors")
    if cached(single):
        return [single]
    index = fetch_json(repo, INDEX, required=False)
    if index is None:
        return [fetch_file(repo, "model.safetensors")]
    weight_map = index.get("weight_map")
    where = f"hf:{repo}'s {INDEX} ({os.path.join(cache_dir(repo), INDEX)})"
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(shard, str) for shard in weight_map.values()):
        raise UserError(f"{where} has no weight_map of tensor names to shard files; delete it to download it "
                        f"again, or choose another checkpoint")
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # all checked before any is downloaded
        if not (is_file_name(shard) and shard.endswith(".safetensors")):
            raise UserError(f"{where} names the shard {shard!r}, which is not a .safetensors file inside the "
                            f"repo; the index is broken or hostile, nothing was downloaded")
    return [fetch_file(repo, shard) for shard in shards]


# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}} (offsets relative to the end of the header), then the raw data

# BF16 has no numpy type: its 16 bits are read as int16 and viewed as torch.bfloat16
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64}


def read_safetensors(path):
    """{name: tensor} viewing a copy-on-write memory map of the file: nothing is read until a tensor
    is used, so a 1 GB checkpoint costs no memory beyond the model it is copied into."""
    import torch  # here, not above: prepare_data.py downloads through this file and needs no torch

    def bad(why):
        return UserError(f"{path} is not a readable safetensors file ({why}); delete it and rerun to download it again")

    def counts(value):  # a list of whole numbers >= 0 (a shape, or data offsets)
        return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise bad("bad header length")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and
                counts(info.get("shape")) and counts(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
            raise bad(f"malformed entry for {name}: {str(info)[:80]}")
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{name} has unsupported dtype {dtype}")
        np_dtype = SAFETENSORS_DTYPES[dtype]
        if not 0 <= begin <= end <= data.size or end - begin != math.prod(shape) * np.dtype(np_dtype).itemsize:
            raise bad(f"{name}'s data_offsets do not match its shape or the file size")
        array = data[begin:end].view(np_dtype).reshape(shape)
        t = torch.from_numpy(array)
        tensors[name] = t.view(torch.bfloat16) if dtype == "BF16" else t  # same 16 bits, read as bf16
    return tensors
