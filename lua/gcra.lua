-- gcra: generic cell rate algorithm. One cell per `interval` microseconds (the rate's period
-- divided by its count, rounded down to a whole microsecond), up to `burst` cells back to back.
--
-- KEY    a string: the theoretical arrival time (TAT) of the next cell, in us.
-- ARGV   (the limit's slot in decide.lua) p1 = burst, p2 = interval us, p3 unused.
-- Result allowed, remaining cells, reset us (TAT reaches now), retry_after us, receipt 0,
--        new state, ttl.
-- TTL    until the TAT, plus the slack: a TAT in the past equals a missing key.
-- Trade-off: one integer per key, the least memory of all; same behaviour as token_bucket.
local function gcra(key, now, burst, interval, _, cost)
  local tolerance = burst * interval
  local tat = tonumber(redis.call('GET', key)) or now
  local start = tat
  if now > start then start = now end
  local nxt = start + cost * interval
  if nxt - now <= tolerance then
    return 1, math.floor((tolerance - (nxt - now)) / interval), nxt - now, 0, 0,
      string.format('%d', nxt), nxt - now
  end
  local room = tolerance - (start - now)
  if room < 0 then room = 0 end
  return 0, math.floor(room / interval), start - now, nxt - now - tolerance, 0
end

-- Moves the TAT back by the cells an admission took.
local function gcra_refund(key, _receipt, _burst, interval, _unused, cost)
  local tat = tonumber(redis.call('GET', key))
  if tat == nil then return end
  redis.call('SET', key, string.format('%d', tat - cost * interval), 'KEEPTTL')
end
