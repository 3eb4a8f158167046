-- gcra: generic cell rate algorithm. One cell per `interval` microseconds (the rate's period
-- divided by its count, rounded down to a whole microsecond), up to `burst` cells back to back.
--
-- KEY    a string "<TAT>:<interval>": the theoretical arrival time of the next cell in us, with
--        the interval of the limit that wrote it (the interval depends on N, and a reload may
--        change N; the key does not). A TAT written under another interval and still ahead of
--        now holds cells used: they carry over to the new interval, rounded up
--        (ceil((TAT - now) * interval / its interval), in doubles, as the memory store computes
--        it), at most a whole burst. A plain "<TAT>" (written by an older tollgate) is read as
--        written under the limit's own interval.
-- ARGV   (the limit's slot in decide.lua) p1 = burst, p2 = interval us, p3 unused.
-- Result allowed, remaining cells, reset us (TAT reaches now), retry_after us, receipt 0,
--        new state, ttl.
-- TTL    until the TAT, plus the slack: a TAT in the past equals a missing key.
-- Trade-off: one integer per key, the least memory of all; same behaviour as token_bucket.

-- The stored TAT and the interval it was written under.
local function gcra_state(v, interval)
  local t, i = string.match(v, '^(%d+):(%d+)$')
  if t == nil then return tonumber(v), interval end
  return tonumber(t), tonumber(i)
end

-- The TAT in the limit's interval: cells used under another interval carry over (see above).
local function gcra_tat(key, now, tolerance, interval)
  local tat = now
  local v = redis.call('GET', key)
  if v then
    local was
    tat, was = gcra_state(v, interval)
    if was ~= interval and tat > now then
      local used = math.ceil((tat - now) * interval / was)
      if used > tolerance then used = tolerance end
      tat = now + used
    end
  end
  return tat
end

local function gcra(key, now, burst, interval, _, cost, _peek, delay)
  local tolerance = burst * interval
  local tat = gcra_tat(key, now, tolerance, interval)
  local start = tat
  if now > start then start = now end
  local nxt = start + cost * interval
  if nxt - now <= tolerance + delay then
    -- within `delay` past the tolerance: held until the cells conform
    local held = nxt - now - tolerance
    if held < 0 then held = 0 end
    local room = tolerance - (nxt - now)
    if room < 0 then room = 0 end
    return 1, math.floor(room / interval), nxt - now, held, 0,
      string.format('%d:%d', nxt, interval), nxt - now
  end
  local room = tolerance - (start - now)
  if room < 0 then room = 0 end
  return 0, math.floor(room / interval), start - now, nxt - now - tolerance, 0
end

-- Moves the TAT on by `cost` cells more than were reserved, even past the tolerance (a debt).
local function gcra_charge(key, now, burst, interval, _unused, cost)
  local tat = gcra_tat(key, now, burst * interval, interval)
  if now > tat then tat = now end
  tat = tat + cost * interval
  redis.call('SET', key, string.format('%d:%d', tat, interval), 'PX', ttl_ms(tat - now))
end

-- Moves the TAT back by the cells an admission took, in the interval the TAT is counted in.
local function gcra_refund(key, _receipt, _burst, interval, _unused, cost)
  local v = redis.call('GET', key)
  if not v then return end
  local tat, was = gcra_state(v, interval)
  redis.call('SET', key, string.format('%d:%d', tat - cost * was, was), 'KEEPTTL')
end
