-- single: the decision of a route with exactly one limit (the common case), without decide.lua's
-- dispatch. tollgate joins prelude.lua, one algorithm file, a line naming that algorithm's
-- `check` and `commit` (set_state, or the sliding log's own), and this file: five small scripts.
--
-- KEYS, ARGV and reply: as decide.lua with one limit (ARGV[3] is the algorithm code, unused
-- here). A limit's state is written only when it allows.
local now = decision_time()
local peek = ARGV[2] == '1'
local cost = tonumber(ARGV[7])
local ban_us = tonumber(ARGV[9])
local left = nil
if ban_us > 0 then left = banned(KEYS[1], now) end
if left then
  local shadow = 0
  if ARGV[8] == '1' then shadow = 1 end
  return { shadow, 0, 0, left, left, 0 }
end
local allowed, remaining, reset, retry, receipt, state, ttl =
  check(KEYS[1], now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), cost, peek,
    tonumber(ARGV[10]))
local admitted = allowed
if ARGV[8] == '1' then
  admitted = 1
elseif allowed == 0 and ban_us > 0 then
  if not peek then ban(KEYS[1], now, ban_us) end
  reset, retry = ban_us, ban_us
end
if allowed == 1 and not peek then
  commit(KEYS[1], state, cost, ttl)
end
return { admitted, allowed, remaining, reset, retry, receipt }
