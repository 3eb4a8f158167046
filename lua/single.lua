-- single: the decision of a route with exactly one limit (the common case), without decide.lua's
-- dispatch. tollgate joins prelude.lua, one algorithm file, a line naming that algorithm's
-- `check` and `commit` (set_state, or the sliding log's own), and this file: five small scripts.
--
-- KEYS, ARGV and reply: as decide.lua with one limit (ARGV[3] is the algorithm code, unused
-- here). A limit's state is written only when it allows.
local now = decision_time()
local peek = ARGV[2] == '1'
local cost = tonumber(ARGV[7])
local allowed, remaining, reset, retry, receipt, state, ttl =
  check(KEYS[1], now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), cost, peek)
local admitted = allowed
if ARGV[8] == '1' then admitted = 1 end
if allowed == 1 and not peek then
  commit(KEYS[1], state, cost, ttl)
end
return { admitted, allowed, remaining, reset, retry, receipt }
