-- token_bucket: a bucket of `burst` tokens refilled at the limit's rate. The rate N/P is
-- reduced by gcd(N, P) to refill = N' units per microsecond with one token = unit = P' units,
-- so the level is an exact integer: no drift, no float rounding.
--
-- KEY    a string "<level in units>:<time of that level in us>".
-- ARGV   (the limit's slot in decide.lua) p1 = burst, p2 = refill, p3 = unit.
-- Result allowed, remaining whole tokens, reset us (bucket full again), retry_after us (enough
--        tokens for `cost`), receipt 0, new state, ttl.
-- TTL    until the bucket is full again, plus the slack: a full bucket equals a missing key.
-- Trade-off: constant memory; admits `burst` at once, then the rate.
local function token_bucket(key, now, burst, refill, unit, cost)
  local capacity = burst * unit
  local level, last = capacity, now
  local v = redis.call('GET', key)
  if v then
    local l, t = string.match(v, '^(%d+):(%d+)$')
    level = tonumber(l)
    last = tonumber(t)
  end
  local base = now
  if last > base then base = last end
  local missing = capacity - level
  if missing < 0 then missing = 0 end
  -- compare before multiplying so that a long idle time cannot leave exact integers
  if base - last >= math.ceil(missing / refill) then
    level = capacity
  else
    level = level + (base - last) * refill
  end
  local need = cost * unit
  if level >= need then
    local after = level - need
    local reset = math.ceil((capacity - after) / refill)
    return 1, math.floor(after / unit), reset, 0, 0,
      string.format('%d:%d', after, base), base + reset - now
  end
  return 0, math.floor(level / unit), math.ceil((capacity - level) / refill),
    math.ceil((need - level) / refill), 0
end

-- Puts `cost` tokens back (never above the burst).
local function token_bucket_refund(key, _receipt, burst, _refill, unit, cost)
  local v = redis.call('GET', key)
  if not v then return end
  local l, t = string.match(v, '^(%d+):(%d+)$')
  local level = tonumber(l) + cost * unit
  if level > burst * unit then level = burst * unit end
  redis.call('SET', key, string.format('%d:%s', level, t), 'KEEPTTL')
end
