-- tollgate prelude: helpers shared by the algorithm files. The scripts in this folder are
-- concatenated in this order into one script: prelude.lua, fixed_window.lua, sliding_window.lua,
-- sliding_log.lua, token_bucket.lua, gcra.lua, decide.lua. decide.lua states the whole script's
-- KEYS, ARGV and reply.
--
-- Arithmetic: every number is an integer below 2^53 (tollgate validates the bounds), so Lua's
-- doubles hold it exactly and redis.call converts it to a string without loss. Never use
-- tostring() or `..` on a large number (Lua formats those with %.14g): use string.format('%d').

-- Every key lives this long past the moment its state becomes equivalent to a fresh one
-- (1 s, TTL_SLACK in src/limiter/algorithm.rs), so expiry never races a decision.
local TTL_SLACK_US = 1000000

-- Sets the TTL of `key` to `ttl_us` microseconds plus the slack, rounded up to milliseconds.
local function expire_in(key, ttl_us)
  if ttl_us < 0 then ttl_us = 0 end
  redis.call('PEXPIRE', key, math.ceil((ttl_us + TTL_SLACK_US) / 1000))
end
