-- tollgate prelude: what the algorithm files share. The scripts in this folder are joined into
-- one script in this order: prelude.lua, the algorithm files in the order of tollgate's
-- algorithm table (src/limiter/algorithm.rs: fixed_window, sliding_log, sliding_window,
-- token_bucket, gcra), the dispatch tables `checks`, `commits` and `refunds` that tollgate
-- writes from the same table, then decide.lua (or refund.lua). decide.lua states the whole
-- script's KEYS, ARGV and reply.
--
-- Every algorithm is a function
--   check(key, now, p1, p2, p3, cost, peek, delay)
--     -> allowed 1|0, remaining, reset us, retry_after us, receipt, state, ttl us
-- that reads its key and returns what admitting `cost` would do, and, when allowed, the new
-- state (a string) and how long it must live. decide.lua writes the states only when every
-- enforced limit allowed, through the algorithm's commit: set_state below (one SET ... PX:
-- state and TTL in one command, so nothing is ever written without its TTL), or for the sliding
-- log (a sorted set, whose `state` is the first timestamp to add) sliding_log_commit.
-- A refund function per algorithm gives back what a commit took (see refund.lua), and a charge
-- function adds units past a reservation (a debt; see settle.lua). `delay` (token_bucket and
-- gcra) admits a request that would be admitted within that many us, with the wait as its
-- retry_after: the request is held, its slot taken ahead of time.
--
-- Arithmetic: every number is an integer below 2^53 (tollgate validates the bounds), so Lua's
-- doubles hold it exactly and redis.call converts it to a string without loss. Never use
-- tostring() or `..` on a large number (Lua formats those with %.14g): use string.format('%d').

-- Every key lives this long past the moment its state becomes equivalent to a fresh one
-- (1 s, TTL_SLACK in src/limiter/algorithm.rs), so expiry never races a decision.
local TTL_SLACK_US = 1000000

-- The time of a decision in microseconds since the Unix epoch: ARGV[1] when a caller gives
-- one (tests), else the server's clock, so replicas with skewed clocks agree.
local function decision_time()
  if ARGV[1] == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return tonumber(ARGV[1])
end

-- A TTL for SET ... PX / PEXPIRE: `ttl_us` plus the slack, rounded up to milliseconds.
local function ttl_ms(ttl_us)
  if ttl_us < 0 then ttl_us = 0 end
  return math.ceil((ttl_us + TTL_SLACK_US) / 1000)
end

-- The commit of every algorithm whose state is a string: the state and its TTL in one command.
local function set_state(key, state, _cost, ttl_us)
  redis.call('SET', key, state, 'PX', ttl_ms(ttl_us))
end

-- The charge of the algorithms that take no `cost_from` (validation refuses it for them).
local function no_charge() end

-- Bans (`ban` on a limit): a string "<until us>" under the limit's key + ":ban" (the same hash
-- tag, so the same cluster slot), living until then. While it lives, the limit rejects with
-- what is left of it as retry_after and reset.
local function banned(key, now)
  local v = redis.call('GET', key .. ':ban')
  if v then
    local left = tonumber(v) - now
    if left > 0 then return left end
  end
  return nil
end

local function ban(key, now, ban_us)
  redis.call('SET', key .. ':ban', string.format('%d', now + ban_us), 'PX', ttl_ms(ban_us))
end
