-- token_bucket: a bucket of `burst` tokens refilled at the limit's rate. The rate N/P is
-- reduced by gcd(N, P) to refill = N' units per microsecond with one token = unit = P' units,
-- so the level is an exact integer: no drift, no float rounding.
--
-- KEY    a hash { l = level in units, t = time of that level in us }.
-- ARGV   (the limit's slot in decide.lua) p1 = burst, p2 = refill, p3 = unit.
-- Result { allowed 1|0, remaining whole tokens, reset us (bucket full again),
--          retry_after us (enough tokens for `cost`), commit, receipt 0 }.
-- TTL    until the bucket is full again, plus the slack: a full bucket equals a missing key.
-- Trade-off: constant memory; admits `burst` at once, then the rate.
local function token_bucket(key, now, burst, refill, unit, cost)
  local capacity = burst * unit
  local s = redis.call('HMGET', key, 'l', 't')
  local level, last = capacity, now
  if s[1] then
    level = tonumber(s[1])
    last = tonumber(s[2])
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
    return { 1, math.floor(after / unit), reset, 0, function()
      redis.call('HSET', key, 'l', after, 't', base)
      expire_in(key, base + reset - now)
    end, 0 }
  end
  return { 0, math.floor(level / unit), math.ceil((capacity - level) / refill),
           math.ceil((need - level) / refill), nil, 0 }
end

-- Puts `cost` tokens back (never above the burst).
local function token_bucket_refund(key, _receipt, burst, _refill, unit, cost)
  local level = tonumber(redis.call('HGET', key, 'l'))
  if level == nil then return end
  level = level + cost * unit
  if level > burst * unit then level = burst * unit end
  redis.call('HSET', key, 'l', level)
end
