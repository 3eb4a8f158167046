#!/usr/bin/env bash
# Instruction counts per request (valgrind --tool=callgrind), repeatable whatever else the
# machine is doing: a guide for optimisation next to the wall-clock ratios of bench/run.sh.
#   bench/callgrind.sh MODE [REQUESTS]      MODE as in bench/row.sh (redis modes need redis-server)
# Prints instructions per request for tollgate (startup included, amortised over REQUESTS: run
# two REQUESTS counts and take the difference where startup is heavy, e.g. memory_consumers).
# CG_HEADER='Name: value' adds a request header (an API key, a bearer token).
set -euo pipefail
mode=$1 n=${2:-20000}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/tollgate-cg.XXXXXX)
up_port=18380 tg_port=18390 redis_port=18379
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$up_port; location / { return 200 "ok\n"; } }
}
NGINX
nginx -c "$work/nginx.conf" & pids+=($!)
case $mode in redis*|flood_redis)
  redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >/dev/null & pids+=($!)
  ;;
esac
cargo build --release --locked --bin tollgate --manifest-path "$here/Cargo.toml" >/dev/null 2>&1
cat > "$work/tg.sh" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.out "$here/target/release/tollgate" "\$@"
SH
chmod +x "$work/tg.sh"
TOLLGATE_BIN="$work/tg.sh" "$here/bench/row.sh" "$mode" $tg_port 127.0.0.1:$up_port redis://127.0.0.1:$redis_port/ "$work" 2>"$work/tg.err" &
tg=$!
for _ in $(seq 1 600); do
  curl -s -o /dev/null "http://127.0.0.1:$tg_port/" && break
  sleep 0.2
done
h2load --h1 -n "$n" -c 32 -t 1 ${CG_HEADER:+-H "$CG_HEADER"} "http://127.0.0.1:$tg_port/" > "$work/h2load.txt" 2>&1 || true
kill -TERM $tg
wait $tg || true
total=$(grep -m1 '^summary:' "$work/callgrind.out" | awk '{print $2}')
grep -E "requests:|status codes" "$work/h2load.txt" | sed 's/^ */  /'
echo "$mode: $total instructions, $((total / n)) per request (n=$n)"
echo "profile: callgrind_annotate $work/callgrind.out"
