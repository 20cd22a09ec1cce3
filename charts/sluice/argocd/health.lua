-- Argo CD custom health check for Sluice StreamingQuery resources
-- (group sluice.dev, kind StreamingQuery).
--
-- Argo CD runs this script with the resource in the global `obj` and reads the
-- table it returns: { status = "Healthy" | "Progressing" | "Degraded" |
-- "Suspended", message = "..." }.
--
-- Install it in Argo CD's `argocd-cm` ConfigMap (namespace argocd) under the
-- key resource.customizations.health.<group>_<kind>:
--
--   apiVersion: v1
--   kind: ConfigMap
--   metadata:
--     name: argocd-cm
--     namespace: argocd
--   data:
--     resource.customizations.health.sluice.dev_StreamingQuery: |
--       <the contents of this file>
--
-- Argo CD runs Lua 5.1 (gopher-lua), so keep this file to Lua 5.1 syntax and
-- the base library. Numbers decoded from JSON may be floats (2.0), so they are
-- formatted with %d rather than tostring. It is tested by
-- e2e/argocd-health.sh.

local function result(status, message)
  return { status = status, message = message }
end

-- Returns the first non-empty string among the arguments, or nil.
local function first_text(...)
  for i = 1, select("#", ...) do
    local s = select(i, ...)
    if type(s) == "string" and s ~= "" then
      return s
    end
  end
  return nil
end

-- Returns the condition of the given type, or nil.
local function find_condition(status, condition_type)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

local function is_true(condition)
  return condition ~= nil and condition.status == "True"
end

local metadata = obj.metadata or {}
local spec = obj.spec or {}
local status = obj.status
local generation = metadata.generation

-- 1. The operator has not reported on the latest spec yet: whatever the
--    status says describes an older generation.
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  if generation ~= nil then
    return result("Progressing",
      string.format("Waiting for the operator to observe generation %d", generation))
  end
  return result("Progressing", "Waiting for the operator to observe the latest generation")
end

local phase = status.phase
local ready = find_condition(status, "Ready")
local progressing = find_condition(status, "Progressing")
local degraded = find_condition(status, "Degraded")

-- 2. Suspended on purpose (spec.suspend), or the operator says so.
if spec.suspend == true or phase == "Suspended" then
  return result("Suspended", "The query is suspended")
end

-- 3. Failed, or running but degraded (e.g. retrying after errors).
if is_true(degraded) or phase == "Failed" then
  return result("Degraded",
    first_text(degraded and degraded.message, status.lastError) or "The query failed")
end

-- 4. A bounded query that ran to the end of its input.
if phase == "Completed" then
  return result("Healthy", "The query processed all its input")
end

-- 5. Running and ready.
if phase == "Running" and is_true(ready) then
  return result("Healthy", first_text(ready.message) or "The query is running")
end

-- 6. Anything else (Pending, starting, not ready yet, unknown phase).
return result("Progressing",
  first_text(progressing and progressing.message, ready and ready.message)
    or "Waiting for the query to be ready")
