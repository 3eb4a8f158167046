-- decide: every limit of one request, decided together in one round trip (all-or-nothing).
-- The script tollgate loads is prelude.lua, the five algorithm files and this file, joined.
--
-- KEYS[i]  the state key of limit i: "{prefix}:{identity hash}:{limit id}". The hash tag is the
--          identity, so the keys of limits keyed by the same identity share a cluster slot.
-- ARGV[1]  now in microseconds since the Unix epoch, or "" to read the server's clock with TIME.
--          tollgate always sends "" (replicas with skewed clocks agree because the time comes
--          from Redis); tests send a time through the same argument.
-- ARGV[2]  "1" to peek: decide as usual but write nothing at all (`tollgate explain`), else "0".
-- ARGV[3 + 6 * (i - 1) .. 8 + 6 * (i - 1)]  limit i: algorithm code, p1, p2, p3, cost, shadow.
--          codes: 1 fixed_window, 2 sliding_window, 3 sliding_log, 4 token_bucket, 5 gcra;
--          p1..p3 as each algorithm file says; shadow 1 for a limit that measures but never
--          rejects (mode = "shadow"), else 0.
-- Reply    { admitted 1|0, then for each limit i: allowed 1|0, remaining, reset us, retry us,
--          receipt }, integers only. The receipt identifies what a commit added (see each
--          algorithm's *_refund), for giving it back when another cluster slot rejects.
-- Rejections by "peek" return the same reply; nothing is committed either way.
-- A request is admitted only if every enforced limit allows it; only then is any state written
-- (for each limit that allowed: a shadow limit that would have rejected is not charged), so a
-- rejected request consumes nothing. (Expired sliding_log members are trimmed either way: that
-- changes no decision.)
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

local peek = ARGV[2] == '1'
local algorithms = { fixed_window, sliding_window, sliding_log, token_bucket, gcra }
local results = {}
local admitted = 1
for i = 1, #KEYS do
  local a = 2 + 6 * (i - 1)
  local algorithm = algorithms[tonumber(ARGV[a + 1])]
  local r = algorithm(KEYS[i], now, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), peek)
  results[i] = r
  if r[1] == 0 and ARGV[a + 6] ~= '1' then admitted = 0 end
end

local reply = { admitted }
for i = 1, #KEYS do
  local r = results[i]
  if admitted == 1 and r[1] == 1 and not peek then r[5]() end
  reply[#reply + 1] = r[1]
  reply[#reply + 1] = r[2]
  reply[#reply + 1] = r[3]
  reply[#reply + 1] = r[4]
  reply[#reply + 1] = r[6]
end
return reply
