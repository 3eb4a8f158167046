#!/usr/bin/env python3
"""Helper for bench/slow_clients.sh (standard library only, loopback only).

  slow_clients.py ports N                  print N free TCP ports on 127.0.0.1 (bound to 0, released)
  slow_clients.py wait-port PORT [SECS]    wait until 127.0.0.1:PORT accepts a connection
  slow_clients.py check PORT               GET /, GET /big and POST /post through PORT must answer 200
  slow_clients.py rss PID                  VmRSS (KiB) of PID and all its descendants
  slow_clients.py watch PORT PID SECS OUT  the normal client + the RSS sampler for one attack:
        every 200 ms a GET / on a fresh connection (Connection: close, 10 s timeout) to
        127.0.0.1:PORT, status + latency recorded; every second the RSS of PID's process tree;
        stops sending after SECS seconds, waits for outstanding requests, writes JSON to OUT
  slow_clients.py report DIR               Markdown tables from DIR/*.json + slowhttptest output
"""

import glob
import http.client
import json
import math
import os
import re
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
POLL = 0.2
TIMEOUT = 10.0


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_port(port, limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def tree(pid):
    """pid and all its descendants (nginx: master + workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+)", f.read())
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def request(port, method="GET", path="/", body=None):
    c = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        c.request(method, path, body=body, headers={"Connection": "close"})
        r = c.getresponse()
        data = r.read()
        return r.status, data
    finally:
        c.close()


def check(port):
    st, body = request(port)
    assert (st, body) == (200, b"ok\n"), (st, body)
    st, body = request(port, path="/big")
    assert st == 200 and len(body) == 1 << 20, (st, len(body))
    st, body = request(port, "POST", "/post", b"x" * 8192)
    assert (st, body) == (200, b"ok\n"), (st, body)


def watch(port, pid, seconds, out):
    results = []  # (offset of the send, status or error name, latency s)
    lock = threading.Lock()

    def one(t_send):
        t0 = time.monotonic()
        try:
            st, body = request(port)
            res = st if body == b"ok\n" or st != 200 else "bad body"
        except socket.timeout:
            res = "timeout"
        except OSError as e:
            res = type(e).__name__
        except http.client.HTTPException as e:
            res = type(e).__name__
        with lock:
            results.append((t_send, res, time.monotonic() - t0))

    rss = []
    start = time.monotonic()
    threads = []
    n = 0
    next_rss = start
    while True:
        now = time.monotonic()
        if now >= next_rss:
            rss.append((round(now - start, 2), rss_kib(pid)))
            next_rss += 1.0
        t_send = start + n * POLL
        if t_send - start >= seconds:
            break
        if now >= t_send:
            th = threading.Thread(target=one, args=(round(t_send - start, 2),), daemon=True)
            th.start()
            threads.append(th)
            n += 1
            continue
        time.sleep(max(0.0, min(t_send, next_rss) - time.monotonic()))
    rss.append((round(time.monotonic() - start, 2), rss_kib(pid)))  # the end of the attack window
    for th in threads:
        th.join(TIMEOUT + 5)
    with lock:
        res = sorted(results)
    with open(out, "w") as f:
        json.dump({"sent": n, "results": res, "rss": rss}, f)


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = math.ceil(p / 100.0 * len(sorted_vals)) - 1  # nearest rank
    return sorted_vals[max(0, min(len(sorted_vals) - 1, k))]


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def slowhttptest_summary(path):
    try:
        with open(path, errors="replace") as f:
            text = ANSI.sub("", f.read())
    except OSError:
        return {}
    blocks = text.split("slow HTTP test status on ")
    s = {}
    if len(blocks) > 1:
        last = blocks[-1]
        m = re.match(r"(\d+)", last)
        s["second"] = int(m.group(1)) if m else None
        for key in ("initializing", "pending", "connected", "error", "closed"):
            m = re.search(r"\n%s:\s+(\d+)" % key, last)
            s[key] = int(m.group(1)) if m else None
        m = re.search(r"service available:\s+(\w+)", last)
        s["available"] = m.group(1) if m else "?"
    m = re.search(r"Test ended on (\d+)\w* second", text)
    s["ended"] = int(m.group(1)) if m else None
    m = re.search(r"Exit status:\s*([^\n]+)", text)
    s["exit"] = m.group(1).strip() if m else "?"
    return s


def csv_stats(path):
    """(seconds the probe found the service unavailable, seconds recorded, max connected)"""
    down = total = max_conn = 0
    try:
        with open(path) as f:
            next(f)
            for line in f:
                parts = line.strip().split(",")
                if len(parts) < 5:
                    continue
                total += 1
                max_conn = max(max_conn, int(parts[3]))
                if int(parts[4]) == 0:
                    down += 1
    except (OSError, StopIteration, ValueError):
        return None
    return down, total, max_conn


def mib(k):
    return "%.1f MiB" % (k / 1024.0)


def ms(v):
    return "—" if v is None else ("%.1f" % (v * 1000) if v < 10 else "%.0f" % (v * 1000))


def report(d):
    attacks = {"H": "-H slow headers (slowloris)", "B": "-B slow body (R-U-D-Y)",
               "X": "-X slow read", "R": "-R range header"}
    runs = {}
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        name = os.path.basename(path)[:-5]  # ATTACK-PROXY
        attack, proxy = name.split("-", 1)
        with open(path) as f:
            runs[(attack, proxy)] = json.load(f)
        r = runs[(attack, proxy)]
        try:
            with open(os.path.join(d, name + ".idle")) as f:
                r["idle"] = int(f.read().strip() or 0)
        except OSError:
            r["idle"] = None
        r["st"] = slowhttptest_summary(os.path.join(d, name + ".st.log"))
        r["csv"] = csv_stats(os.path.join(d, name + ".csv"))
    order = [a for a in "HBXR" if any(k[0] == a for k in runs)]
    proxies = ["tollgate", "nginx"]
    L = ["| attack | proxy | normal client: 200 answers / sent | other outcomes | p50 ms | p99 ms | max ms "
         "| RSS before | RSS max | RSS at the end | tollgate / nginx RSS (max; end) | tollgate targets |",
         "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in order:
        for p in proxies:
            r = runs.get((a, p))
            if r is None:
                continue
            ok = sorted(lat for _, res, lat in r["results"] if res == 200)
            other = {}
            for _, res, _ in r["results"]:
                if res != 200:
                    other[str(res)] = other.get(str(res), 0) + 1
            unanswered = r["sent"] - len(r["results"])
            if unanswered:
                other["no result"] = unanswered
            other_s = ", ".join("%s × %d" % kv for kv in sorted(other.items())) or "—"
            vals = [k for _, k in r["rss"]]
            r["max"], r["end"] = max(vals), vals[-1]
            r["okpct"] = 100.0 * len(ok) / max(r["sent"], 1)
            r["p99"] = pct(ok, 99)
            ratio, targets = "", ""
            if p == "tollgate" and (a, "nginx") in runs:
                n = runs[(a, "nginx")]
                nv = [k for _, k in n["rss"]]
                rmax, rend = r["max"] / max(nv), r["end"] / nv[-1]
                ratio = "%.2f; %.2f" % (rmax, rend)
                miss = []
                if len(ok) != r["sent"]:
                    miss.append("answers %.1f %%" % r["okpct"])
                if r["p99"] is None or r["p99"] >= 0.1:
                    miss.append("p99 %s ms" % ms(r["p99"]))
                if rmax >= 1.5:
                    miss.append("RSS %.2f×" % rmax)
                targets = "met" if not miss else "missed: " + ", ".join(miss)
            L.append("| %s | %s | %d / %d (%.1f %%) | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                attacks[a], p, len(ok), r["sent"], r["okpct"], other_s, ms(pct(ok, 50)), ms(r["p99"]),
                ms(ok[-1] if ok else None), "—" if r["idle"] is None else mib(r["idle"]),
                mib(r["max"]), mib(r["end"]), ratio, targets))
    L += ["", "slowhttptest's own final status (its probe waits `-p 3` s for an answer; "
          "\"probe down\" = seconds of the per-second CSV in which it did not get one):", "",
          "| attack | proxy | final status | probe down | most connected | ended |",
          "|---|---|---|---:|---:|---|"]
    for a in order:
        for p in proxies:
            r = runs.get((a, p))
            if r is None:
                continue
            s = r["st"]
            line = "closed %s, pending %s, connected %s, error %s; service available: %s" % (
                s.get("closed"), s.get("pending"), s.get("connected"), s.get("error"), s.get("available"))
            c = r["csv"]
            down = "%d of %d s" % (c[0], c[1]) if c else "?"
            most = str(c[2]) if c else "?"
            L.append("| %s | %s | %s | %s | %s | second %s: %s |" % (
                attacks[a], p, line, down, most, s.get("ended"), s.get("exit")))
    print("\n".join(L))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ports":
        print(" ".join(map(str, free_ports(int(args[0])))))
    elif cmd == "wait-port":
        sys.exit(0 if wait_port(int(args[0]), float(args[1]) if len(args) > 1 else 20) else 1)
    elif cmd == "check":
        check(int(args[0]))
    elif cmd == "rss":
        print(rss_kib(int(args[0])))
    elif cmd == "watch":
        watch(int(args[0]), int(args[1]), float(args[2]), args[3])
    elif cmd == "report":
        report(args[0])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
