//! The configured resources plugins read outside their own conf: `apisix.http.service`
//! (lua/apisix/http/service.lua) gets a service by id or the list, `apisix.router`'s
//! `http_routes()` the routes, from the published snapshot, in a request or a timer alike;
//! `apisix.api_router` the loaded plugins that declare `api()` endpoints.

use mlua::{Lua, LuaSerdeExt, Table, Value};

/// A service as APISIX's `services:get(id)` returns it: `{ value = conf, modifiedIndex }`.
fn service_item(lua: &Lua, s: &crate::config::Service, version: u64) -> mlua::Result<Table> {
    let item = lua.create_table()?;
    let conf = serde_json::to_value(s).map_err(mlua::Error::external)?;
    item.set("value", lua.to_value(&conf)?)?;
    item.set("modifiedIndex", version)?;
    if let Some(id) = &s.id {
        item.set("key", format!("/apisix/services/{id}"))?;
    }
    Ok(item)
}

/// A route as an item of APISIX's `router.http_routes()`: `{ value = conf, key, modifiedIndex }`.
fn route_item(lua: &Lua, r: &crate::config::Route, version: u64) -> mlua::Result<Table> {
    let item = lua.create_table()?;
    let conf = serde_json::to_value(r).map_err(mlua::Error::external)?;
    item.set("value", lua.to_value(&conf)?)?;
    item.set("modifiedIndex", version)?;
    if let Some(id) = &r.id {
        item.set("key", format!("/apisix/routes/{id}"))?;
    }
    Ok(item)
}

pub(crate) fn install(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    // routes() -> { item, ... }, conf_version | nil, nil
    mg.set(
        "routes",
        lua.create_function(|lua, ()| {
            let Some(doc) = crate::snapshot::published_doc() else {
                return Ok((Value::Nil, Value::Nil));
            };
            let (version, doc) = &*doc;
            let list = lua.create_table()?;
            for r in &doc.routes {
                list.push(route_item(lua, r, *version)?)?;
            }
            Ok((Value::Table(list), Value::Integer(*version as i64)))
        })?,
    )?;
    // api_plugins() -> { module, ... }, key: the loaded plugins defining api(), by name; the
    // key changes when that set does.
    mg.set(
        "api_plugins",
        lua.create_function(|lua, ()| {
            let Some(rt) = super::runtime::current_runtime() else {
                return Ok((lua.create_table()?, String::new()));
            };
            let (mods, key) = rt.api_modules();
            Ok((lua.create_sequence_from(mods)?, key))
        })?,
    )?;
    // service_get(id) -> item | nil
    mg.set(
        "service_get",
        lua.create_function(|lua, id: Value| {
            let id = match id {
                Value::String(s) => s.to_str()?.to_string(),
                Value::Integer(i) => i.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return Ok(Value::Nil),
            };
            let Some(doc) = crate::snapshot::published_doc() else {
                return Ok(Value::Nil);
            };
            let (version, doc) = &*doc;
            match doc
                .services
                .iter()
                .find(|s| s.id.as_ref().is_some_and(|i| i.0 == id))
            {
                Some(s) => Ok(Value::Table(service_item(lua, s, *version)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    // services() -> { item, ... }, conf_version | nil, nil
    mg.set(
        "services",
        lua.create_function(|lua, ()| {
            let Some(doc) = crate::snapshot::published_doc() else {
                return Ok((Value::Nil, Value::Nil));
            };
            let (version, doc) = &*doc;
            let list = lua.create_table()?;
            for s in &doc.services {
                list.push(service_item(lua, s, *version)?)?;
            }
            Ok((Value::Table(list), Value::Integer(*version as i64)))
        })?,
    )?;
    Ok(())
}
