"""Concurrent clients for `logit-lens serve`: POST /lens (multipart, the notebook's request: summary on,
top-5 at the last position) at a given concurrency; prints one JSON line with throughput and latency.
Standard library only, so it runs with any python3.

Usage: python bench/gpu/load.py --url http://127.0.0.1:8000 --model NAME --image FILE --prompt TEXT
                                --concurrency 8 --requests 64
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor


def multipart(fields: dict, image: bytes, filename: str):
    b = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f'Content-Type: image/png\r\n\r\n'.encode() + image + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={b}"


def post(url, body, ctype, timeout=600):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
        return time.perf_counter() - t0, r.status, json.loads(data), dict(r.headers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Color of the main object:")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--options", default='{"top_k": 5, "positions": "last", "summary": true}')
    a = ap.parse_args()
    image = open(a.image, "rb").read()
    fields = {"prompt": a.prompt, "options": a.options}
    if a.model:
        fields["model"] = a.model
    body, ctype = multipart(fields, image, a.image.rsplit("/", 1)[-1])
    url = a.url.rstrip("/") + "/lens"
    post(url, body, ctype)  # warm-up
    lat, timings, errors = [], [], []
    lock = threading.Lock()

    def one(_):
        try:
            dt, status, resp, _ = post(url, body, ctype)
            with lock:
                lat.append(dt)
                timings.append(resp.get("timing_ms", {}))
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(str(e))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.concurrency) as ex:
        list(ex.map(one, range(a.requests)))
    wall = time.perf_counter() - t0
    stage = {k: round(statistics.median(t.get(k, 0) for t in timings), 2)
             for k in ("queue", "preprocess", "forward", "lens", "total")} if timings else {}
    print(json.dumps({
        "image": a.image.rsplit("/", 1)[-1], "model": a.model, "concurrency": a.concurrency,
        "requests": a.requests, "ok": len(lat), "errors": errors[:3],
        "throughput_ms_per_request": round(wall / max(len(lat), 1) * 1e3, 2),
        "latency_ms_median": round(statistics.median(lat) * 1e3, 2) if lat else None,
        "latency_ms_p90": round(sorted(lat)[int(0.9 * (len(lat) - 1))] * 1e3, 2) if lat else None,
        "server_stage_ms_median": stage}), flush=True)


if __name__ == "__main__":
    main()
