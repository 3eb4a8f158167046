-- decide: every limit of one request, decided together in one round trip (all-or-nothing).
-- The script tollgate loads is prelude.lua, the five algorithm files, the dispatch tables
-- `checks`, `commits` and `refunds` (indexed by algorithm code; tollgate writes them from its
-- algorithm table, src/limiter/algorithm.rs) and this file, joined.
--
-- KEYS[i]  the state key of limit i: "{prefix}:{identity hash}:{limit id}". The hash tag is the
--          identity, so the keys of limits keyed by the same identity share a cluster slot.
-- ARGV[1]  now in microseconds since the Unix epoch, or "" to read the server's clock with TIME.
--          tollgate always sends "" (replicas with skewed clocks agree because the time comes
--          from Redis); tests send a time through the same argument.
-- ARGV[2]  "1" to peek: decide as usual but write nothing at all (`tollgate explain`), else "0".
-- ARGV[3 + 8 * (i - 1) .. 10 + 8 * (i - 1)]  limit i: algorithm code, p1, p2, p3, cost, shadow,
--          ban us, delay us.
--          codes: 1 fixed_window, 2 sliding_log, 3 sliding_window, 4 token_bucket, 5 gcra,
--          6 concurrency; p1..p3 as each algorithm file says; shadow 1 for a limit that
--          measures but never rejects (mode = "shadow"), else 0; ban > 0: a rejection by this
--          limit bans the identity from it for that long (see `banned` in prelude.lua); delay
--          > 0: a request admitted within that long is held (token_bucket, gcra).
-- Reply    { admitted 1|0, then for each limit i: allowed 1|0, remaining, reset us, retry us,
--          receipt }, integers only. The receipt identifies what a commit added (see each
--          algorithm's *_refund), for giving it back when another cluster slot rejects.
-- Rejections by "peek" return the same reply; nothing is committed either way.
-- A request is admitted only if every enforced limit allows it; only then is any state written
-- (for each limit that allowed: a shadow limit that would have rejected is not charged), so a
-- rejected request consumes nothing. (Expired sliding_log members are trimmed either way: that
-- changes no decision.)
local now = decision_time()

local peek = ARGV[2] == '1'
-- Per limit, flat: allowed, remaining, reset, retry, receipt, state, ttl, code.
local r = {}
local admitted = 1
for i = 1, #KEYS do
  local a = 2 + 8 * (i - 1)
  local code = tonumber(ARGV[a + 1])
  local ban_us = tonumber(ARGV[a + 7])
  local o = 8 * (i - 1)
  local left = nil
  if ban_us > 0 then left = banned(KEYS[i], now) end
  if left then
    r[o + 1], r[o + 2], r[o + 3], r[o + 4], r[o + 5] = 0, 0, left, left, 0
  else
    r[o + 1], r[o + 2], r[o + 3], r[o + 4], r[o + 5], r[o + 6], r[o + 7] =
      checks[code](KEYS[i], now, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
        tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), peek, tonumber(ARGV[a + 8]))
    if r[o + 1] == 0 and ban_us > 0 and ARGV[a + 6] ~= '1' then
      -- Rejected by a limit with a ban: the ban starts now and is the answer.
      if not peek then ban(KEYS[i], now, ban_us) end
      r[o + 3], r[o + 4] = ban_us, ban_us
    end
  end
  r[o + 8] = code
  if r[o + 1] == 0 and ARGV[a + 6] ~= '1' then admitted = 0 end
end

local reply = { admitted }
for i = 1, #KEYS do
  local o = 8 * (i - 1)
  if admitted == 1 and r[o + 1] == 1 and not peek then
    commits[r[o + 8]](KEYS[i], r[o + 6], tonumber(ARGV[2 + 8 * (i - 1) + 5]), r[o + 7])
  end
  local n = #reply
  reply[n + 1] = r[o + 1]
  reply[n + 2] = r[o + 2]
  reply[n + 3] = r[o + 3]
  reply[n + 4] = r[o + 4]
  reply[n + 5] = r[o + 5]
end
return reply
