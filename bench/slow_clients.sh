#!/usr/bin/env bash
# Slow-client attacks (Debian's slowhttptest) against release tollgate and, side by side, nginx
# as a reverse proxy, both in front of the same nginx upstream:
#   -H slow headers (slowloris), -B slow body (R-U-D-Y), -X slow read, -R range header,
#   each with SLOW_CONNECTIONS (1500) connections at 200/s for SLOW_SECONDS (60) s.
# During every attack a normal client (bench/slow_clients.py watch) sends GET / every 200 ms on
# a fresh connection and records status + latency, and the proxy's RSS (its whole process tree)
# is sampled every second. Prints Markdown; with SLOW_WRITE=1 it also puts it into BENCHMARKS.md
# as the section "## Slow clients (slowhttptest)" (replaced if present, else appended).
#
#   bench/slow_clients.sh
# Environment: SLOW_SECONDS (60), SLOW_CONNECTIONS (1500), SLOW_ATTACKS ("H B X R"),
#   SLOW_PROXIES ("tollgate nginx"), TOLLGATE_BIN (target/release/tollgate), SLOW_WRITE (0).
# Placement (2 cores, as bench/extra.py): the proxy under test alone on cpu0; the upstream,
# slowhttptest and the normal client on cpu1. Loopback only, free ports picked at run time.
# Every process started here runs in its own process group and is stopped by that group's id,
# at the end of its run and on error / Ctrl-C (trap). Logs stay in the printed temp directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
helper="$here/slow_clients.py"
secs=${SLOW_SECONDS:-60}
conns=${SLOW_CONNECTIONS:-1500}
attacks=${SLOW_ATTACKS:-"H B X R"}
proxies=${SLOW_PROXIES:-"tollgate nginx"}
bin=${TOLLGATE_BIN:-$root/target/release/tollgate}
host=127.0.0.1
cmdline="bench/slow_clients.sh"
[[ $secs != 60 ]] && cmdline="SLOW_SECONDS=$secs $cmdline"
[[ $conns != 1500 ]] && cmdline="SLOW_CONNECTIONS=$conns $cmdline"
[[ ${SLOW_WRITE:-0} == 1 ]] && cmdline="SLOW_WRITE=1 $cmdline"

[[ -x $bin ]] || { echo "no $bin: cargo build --release --locked --bin tollgate" >&2; exit 1; }
for t in slowhttptest nginx taskset python3; do
  command -v "$t" >/dev/null || { echo "$t is missing" >&2; exit 1; }
done

work=$(mktemp -d /tmp/tollgate-slow.XXXXXX)
echo "logs and configs in $work" >&2
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# --- processes: each in its own process group (setsid), remembered by pid == pgid -------------
pids=()
started=0
start() { # name cpu command... ; sets $started
  local name=$1 cpu=$2; shift 2
  setsid taskset -c "$cpu" "$@" >"$work/$name.log" 2>&1 &
  started=$!
  pids+=("$started")
}
stop() { # pid
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
forget() { # pid: no longer ours to stop (it has exited)
  local keep=() i
  for i in "${pids[@]}"; do [[ $i == "$1" ]] || keep+=("$i"); done
  pids=("${keep[@]+"${keep[@]}"}")
}
cleanup() { # every group at once: TERM, up to 5 s, then KILL
  local rc=$? p i
  trap - EXIT INT TERM
  for p in "${pids[@]+"${pids[@]}"}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  for i in $(seq 50); do
    local alive=0
    for p in "${pids[@]+"${pids[@]}"}"; do kill -0 -- "-$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for p in "${pids[@]+"${pids[@]}"}"; do kill -KILL -- "-$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r up_port px_port admin_port < <(python3 "$helper" ports 3)

# --- the upstream: nginx, `/` -> "ok\n", `/post` -> "ok\n" once the body is in, `/big` -> 1 MiB ---
chmod 755 "$work"  # nginx workers (user nobody) read www/big
mkdir -p "$work/www"
head -c 1048576 /dev/zero | tr '\0' 'a' >"$work/www/big"
temp_paths() { # prefix
  local d=$work/$1
  echo "client_body_temp_path ${d}_body; proxy_temp_path ${d}_proxy; fastcgi_temp_path ${d}_fcgi;"
  echo "  uwsgi_temp_path ${d}_uwsgi; scgi_temp_path ${d}_scgi;"
}
cat >"$work/upstream.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $work/upstream.pid;
error_log $work/upstream.err warn;
events { worker_connections 8192; multi_accept on; }
http {
  access_log off;
  default_type text/plain;
  $(temp_paths upstream)
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server {
    listen $host:$up_port backlog=4096;
    location / { return 200 "ok\n"; }
    # reads the whole request body (proxy_request_buffering) before answering, as an application
    # would; a bare 'return 200' answers at once, and tollgate, which streams request bodies,
    # would then hand that answer back and close the slow body's connection within a second
    location = /post { proxy_pass http://$host:$up_port/; }
    location = /big { root $work/www; }
  }
}
EOF

# --- nginx as the reverse proxy: the settings of the nginx row of ../shared/bench/peers.py ---
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 8192; multi_accept on; }
http {
  access_log off;
  default_type text/plain;
  $(temp_paths nginx)
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  upstream up {
    server $host:$up_port;
    keepalive 128;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }
  server {
    listen $host:$px_port backlog=4096;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

# --- tollgate: memory store, one open route, one worker, default timeouts and limits ---
cat >"$work/tollgate.toml" <<EOF
[server]
listen = "$host:$px_port"
admin = "$host:$admin_port"
workers = 1

[store]
backend = "memory"

[upstreams.up]
targets = ["http://$host:$up_port"]

[[routes]]
name = "all"
upstream = "up"
EOF

start upstream 1 nginx -p "$work" -c "$work/upstream.conf" -e "$work/upstream.starterr"
python3 "$helper" wait-port "$up_port" || { echo "upstream did not listen (see $work)" >&2; exit 1; }

start_proxy() { # proxy ; sets $started
  case $1 in
    tollgate) start tollgate-$attack 0 env RUST_LOG="${RUST_LOG:-warn}" "$bin" run --config "$work/tollgate.toml" ;;
    nginx)    start nginx-$attack 0 nginx -p "$work" -c "$work/nginx.conf" -e "$work/nginx.starterr" ;;
  esac
  python3 "$helper" wait-port "$px_port" || { echo "$1 did not listen (see $work)" >&2; exit 1; }
  python3 "$helper" check "$px_port"
}

attack_args() { # attack
  case $1 in
    H) echo "-H -i 10 -t GET -u http://$host:$px_port/" ;;
    B) echo "-B -i 110 -s 8192 -t POST -u http://$host:$px_port/post" ;;
    X) echo "-X -k 3 -n 5 -w 512 -y 1024 -z 32 -t GET -u http://$host:$px_port/big" ;;
    R) echo "-R -a 10 -b 3000 -t GET -u http://$host:$px_port/big" ;;
    *) echo "unknown attack $1" >&2; exit 2 ;;
  esac
}

for attack in $attacks; do
  case $attack in H|B|X|R) ;; *) echo "unknown attack $attack (SLOW_ATTACKS: H B X R)" >&2; exit 2 ;; esac
done
t_begin=$(date +%s)
for attack in $attacks; do
  for proxy in $proxies; do
    run=$attack-$proxy
    start_proxy "$proxy"
    px_pid=$started
    sleep 1
    python3 "$helper" rss "$px_pid" >"$work/$run.idle"
    # shellcheck disable=SC2046
    st_args=(-c "$conns" -r 200 -l "$secs" -p 3 -g -o "$work/$run" $(attack_args "$attack"))
    echo "slowhttptest ${st_args[*]}" >"$work/$run.cmd"
    log "$run: slowhttptest ${st_args[*]}"
    start "$run.watch" 1 python3 "$helper" watch "$px_port" "$px_pid" "$secs" "$work/$run.json.part"
    watch_pid=$started
    start "$run.st" 1 timeout -k 5 $((secs + 60)) slowhttptest "${st_args[@]}"
    st_pid=$started
    wait "$watch_pid" || { echo "normal client failed (see $work/$run.watch.log)" >&2; exit 1; }
    forget "$watch_pid"
    wait "$st_pid" || log "$run: slowhttptest exited with $? (see $work/$run.st.log)"
    forget "$st_pid"
    mv "$work/$run.json.part" "$work/$run.json"
    python3 "$helper" rss "$px_pid" >"$work/$run.after"
    stop "$px_pid"
    for i in $(seq 50); do python3 "$helper" wait-port "$px_port" 0.1 || break; sleep 0.1; done
    log "$run: done (RSS $(cat "$work/$run.idle") KiB before, $(cat "$work/$run.after") KiB after the attack)"
  done
done
elapsed=$(( $(date +%s) - t_begin ))
stop "${pids[0]}" # the upstream

st_version=$(slowhttptest -h 2>&1 | grep -m1 -o 'version [0-9.]*' || true)
ngx_version=$(nginx -v 2>&1 | sed 's/^nginx version: //')
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
out=$work/slow_clients.md
{
  echo "## Slow clients (slowhttptest)"
  echo
  echo "Generated by \`$cmdline\` on $(date -u +%Y-%m-%d) (tollgate $commit, $ngx_version, slowhttptest $st_version;"
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); the attacks took $((elapsed / 60)) min $((elapsed % 60)) s)."
  echo "Each attack: \`slowhttptest -c $conns -r 200 -l $secs -p 3\` plus"
  echo "-H \`-i 10\` on \`/\`; -B \`-i 110 -s 8192 -t POST\` on \`/post\`; -X \`-k 3 -n 5 -w 512 -y 1024 -z 32\` on \`/big\`;"
  echo "-R \`-a 10 -b 3000\` on \`/big\`. Same nginx upstream for both proxies: \`/\` returns 200 \"ok\\n\"; \`/post\`"
  echo "reads the whole body before it answers the same (the upstream nginx proxies it to its own \`/\`);"
  echo "\`/big\` is a 1 MiB static file. tollgate: release build, \`workers = 1\`, memory store, one route without"
  echo "limits, every timeout and limit at its default (header_read_timeout 10 s, body_idle_timeout 30 s,"
  echo "send_timeout 60 s, max_connections 10000). nginx: the proxy_pass row of ../shared/bench/peers.py"
  echo "(1 worker, worker_connections 8192, upstream keepalive 128, nginx's default timeouts and buffering)."
  echo "The proxy alone on cpu0; upstream, slowhttptest and the normal client on cpu1."
  echo
  echo "The normal client sends GET / every 200 ms for the attack's $secs s, each on a fresh connection"
  echo "(\`Connection: close\`, 10 s timeout), and counts 200 answers with the body \"ok\\n\"; latency = connect to"
  echo "last byte, percentiles over the 200 answers. RSS = VmRSS of the proxy's process tree (nginx: master +"
  echo "worker) sampled every second during the attack; \"before\" = 1 s after start, idle; \"at the end\" = the"
  echo "sample at ${secs} s (after slowhttptest stopped if it ended early, see \"ended\" below). Targets for"
  echo "tollgate: 100 % answers, p99 < 100 ms, RSS max < 1.5 × nginx's in the same attack."
  echo
  echo "slowhttptest stops before its time limit once none of its connections is open (\"No open connections"
  echo "left\"): tollgate closes slow headers after header_read_timeout (10 s) and slow bodies when the"
  echo "upstream has sent no response head for the upstream \`timeout\` (30 s, logged as \"did not send a"
  echo "response head within 30s\"), while nginx's client_header_timeout / client_body_timeout (60 s) keep"
  echo "them for the whole test. -R is over in seconds for both: slowhttptest's Range header is 23 KB, which"
  echo "nginx (the proxy, or the upstream behind tollgate, which forwards it) rejects at once with 400"
  echo "\"Request Header Or Cookie Too Large\". For -X, nginx buffers each 1 MiB upstream answer into a temp"
  echo "file (proxy_buffering, its default); tollgate streams it with backpressure."
  echo
  python3 "$helper" report "$work"
} >"$out"
cat "$out"
if [[ ${SLOW_WRITE:-0} == 1 ]]; then
  python3 - "$root/BENCHMARKS.md" "$out" <<'EOF'
import re, sys
path, new = sys.argv[1], open(sys.argv[2]).read().rstrip("\n") + "\n"
text = open(path).read()
head = "## Slow clients (slowhttptest)"
i = text.find("\n" + head + "\n")
if i < 0:
    text = text.rstrip("\n") + "\n\n" + new
else:
    j = text.find("\n## ", i + 1)
    text = text[:i + 1] + new + ("\n" + text[j + 1:] if j >= 0 else "")
open(path, "w").write(text)
EOF
  log "wrote the section into $root/BENCHMARKS.md"
fi
log "total $elapsed s of attacks; logs in $work"
