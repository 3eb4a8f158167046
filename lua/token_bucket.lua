-- token_bucket: a bucket of `burst` tokens refilled at the limit's rate. The rate N/P is
-- reduced by gcd(N, P) to refill = N' units per microsecond with one token = unit = P' units,
-- so the level is an exact integer: no drift, no float rounding.
--
-- KEY    a string "<level in units>:<time of that level in us>:<burst>:<refill>:<unit>": the
--        level with the parameters of the limit that wrote it, since the unit depends on N and
--        a reload may change N (the key does not). A state written under other parameters is
--        first refilled to now under them (the store cannot know when the reload happened),
--        then its tokens carry over, rounded down (floor(level * unit / its unit), in doubles,
--        as the memory store computes it), at most the new burst; a bucket that was full is
--        full. A two-field "<level>:<time>" (written by an older tollgate) is read as written
--        under the limit's own parameters.
-- ARGV   (the limit's slot in decide.lua) p1 = burst, p2 = refill, p3 = unit.
-- Result allowed, remaining whole tokens, reset us (bucket full again), retry_after us (enough
--        tokens for `cost`), receipt 0, new state, ttl.
-- TTL    until the bucket is full again, plus the slack: a full bucket equals a missing key.
-- Trade-off: constant memory; admits `burst` at once, then the rate.

-- The stored level, its time and the parameters it was written under.
local function token_bucket_state(v, burst, refill, unit)
  local l, t, b, r, u = string.match(v, '^(%d+):(%d+):(%d+):(%d+):(%d+)$')
  if l == nil then
    l, t = string.match(v, '^(%d+):(%d+)$')
    return tonumber(l), tonumber(t), burst, refill, unit
  end
  return tonumber(l), tonumber(t), tonumber(b), tonumber(r), tonumber(u)
end

-- `level` after `elapsed` us at `refill` units per us, at most `capacity`. Compare before
-- multiplying so that a long idle time cannot leave exact integers.
local function token_bucket_refilled(level, elapsed, capacity, refill)
  local missing = capacity - level
  if missing < 0 then missing = 0 end
  if elapsed >= math.ceil(missing / refill) then return capacity end
  return level + elapsed * refill
end

-- The level at base = max(now, the state's time), in the limit's units: a state written under
-- other parameters is refilled to base under them, then its tokens carry over (see above).
local function token_bucket_level(key, now, burst, refill, unit)
  local capacity = burst * unit
  local level, last = capacity, now
  local v = redis.call('GET', key)
  local base = now
  if v then
    local b, r, u
    level, last, b, r, u = token_bucket_state(v, burst, refill, unit)
    if last > base then base = last end
    if b ~= burst or r ~= refill or u ~= unit then
      local was_capacity = b * u
      local was = token_bucket_refilled(level, base - last, was_capacity, r)
      if was >= was_capacity then
        level = capacity
      else
        level = was
        if u ~= unit then level = math.floor(level * unit / u) end
        if level > capacity then level = capacity end
      end
      last = base
    end
  end
  return token_bucket_refilled(level, base - last, capacity, refill), base
end

local function token_bucket(key, now, burst, refill, unit, cost, _peek, delay)
  local capacity = burst * unit
  local level, base = token_bucket_level(key, now, burst, refill, unit)
  local need = cost * unit
  -- A state ahead of now (a debt, a held request, a clock that stepped back) counts from its
  -- own time: every wait is measured from now.
  local ahead = base - now
  if level >= need then
    local after = level - need
    local reset = ahead + math.ceil((capacity - after) / refill)
    return 1, math.floor(after / unit), reset, 0, 0,
      string.format('%d:%d:%d:%d:%d', after, base, burst, refill, unit), reset
  end
  local wait = math.ceil((need - level) / refill)
  if ahead + wait <= delay then
    -- held: at base + wait the bucket holds enough; the tokens are taken then
    local after = level + wait * refill - need
    local reset = ahead + wait + math.ceil((capacity - after) / refill)
    return 1, 0, reset, ahead + wait, 0,
      string.format('%d:%d:%d:%d:%d', after, base + wait, burst, refill, unit), reset
  end
  return 0, math.floor(level / unit), ahead + math.ceil((capacity - level) / refill),
    ahead + wait, 0
end

-- Takes `cost` tokens more than were reserved, even past empty: the debt moves the state's time
-- ahead by the us the refill needs to pay it back (what rounding up adds is kept as level).
-- In the limit's parameters, as a check converts them.
local function token_bucket_charge(key, now, burst, refill, unit, cost)
  local have, base = token_bucket_level(key, now, burst, refill, unit)
  local need = cost * unit
  local level, last
  if have >= need then
    level, last = have - need, base
  else
    local wait = math.ceil((need - have) / refill)
    level, last = have + wait * refill - need, base + wait
  end
  local missing = burst * unit - level
  if missing < 0 then missing = 0 end
  local full_at = last + math.ceil(missing / refill)
  redis.call('SET', key, string.format('%d:%d:%d:%d:%d', level, last, burst, refill, unit),
    'PX', ttl_ms(full_at - now))
end

-- Puts `cost` tokens back (never above the burst), in the units the state is counted in.
local function token_bucket_refund(key, _receipt, burst, refill, unit, cost)
  local v = redis.call('GET', key)
  if not v then return end
  local level, t, b, r, u = token_bucket_state(v, burst, refill, unit)
  level = level + cost * u
  if level > b * u then level = b * u end
  redis.call('SET', key, string.format('%d:%d:%d:%d:%d', level, t, b, r, u), 'KEEPTTL')
end
