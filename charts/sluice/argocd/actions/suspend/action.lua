-- Argo CD action "suspend" of a StreamingQuery: the engine pods stop, the
-- checkpoint is kept (spec.suspend: true). See ../discovery.lua.
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.suspend = true
return obj
