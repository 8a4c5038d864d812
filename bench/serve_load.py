#!/usr/bin/python3
"""Load test of `vf serve` on loopback: requests/s and p50/p99 latency at 1, 8 and 64 concurrent
clients posting one image to /v1/models/NAME, images per forward (the dynamic batching, from the
server's statistics), and the server's RSS before and after (10,000 requests in all by default).

    /usr/bin/python3 bench/serve_load.py --vf build/vf --model assets/tiny-convnext --image assets/cat.jpg
"""
import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def forwards(port):
    """The server's (images, forwards) so far: GET /v2/models/m/stats."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v2/models/m/stats")
    s = json.loads(conn.getresponse().read())["model_stats"][0]
    conn.close()
    return s["inference_count"], s["execution_count"]


def run_level(port, path, body, clients, requests):
    latencies, errors, reasons = [], [0], []
    lock = threading.Lock()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def client(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
                if not ok:
                    reasons.append(f"HTTP {r.status}")
            except (OSError, http.client.HTTPException) as e:
                reasons.append(type(e).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                ok = False
            mine.append(time.perf_counter() - t0)
            if not ok:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    if reasons:
        print(f"  errors at {clients} clients: {sorted(set(reasons))}", file=sys.stderr)
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"clients": clients, "requests": requests, "errors": errors[0], "rps": requests / elapsed,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vf", default="build/vf")
    ap.add_argument("--model", default="assets/tiny-convnext")
    ap.add_argument("--image", default="assets/cat.jpg")
    ap.add_argument("--requests", type=int, nargs=3, default=[1000, 3000, 6000],
                    help="requests at 1, 8 and 64 clients (default: 10,000 in all)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the three levels (RSS after each round)")
    args = ap.parse_args()

    server = subprocess.Popen([args.vf, "serve", f"m={args.model}", "--port", "0", "--max-batch", str(args.max_batch),
                               "--max-queue", "256"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        m = re.match(r"listening on http://[^:]+:(\d+)", line)
        if not m:
            sys.exit(f"vf serve did not start: {line!r}")
        port = int(m.group(1))
        with open(args.image, "rb") as f:
            body = f.read()
        run_level(port, "/v1/models/m", body, 1, 20)  # warm-up, not counted
        rss_before = rss_kib(server.pid)
        print(f"server RSS before: {rss_before / 1024:.1f} MiB")
        for round in range(args.rounds):
            print(f"{'clients':>8} {'requests':>9} {'errors':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'img/fwd':>8}")
            for clients, n in zip((1, 8, 64), args.requests):
                images0, forwards0 = forwards(port)
                r = run_level(port, "/v1/models/m", body, clients, n)
                images1, forwards1 = forwards(port)
                per_forward = (images1 - images0) / max(forwards1 - forwards0, 1)
                print(f"{r['clients']:>8} {r['requests']:>9} {r['errors']:>7} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} "
                      f"{r['p99_ms']:>8.1f} {per_forward:>8.2f}", flush=True)
            rss_after = rss_kib(server.pid)
            print(f"server RSS after {(round + 1) * sum(args.requests)} requests: {rss_after / 1024:.1f} MiB", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=60)
        print(f"vf serve exit status after SIGTERM: {rc}")


if __name__ == "__main__":
    main()
