//! The XML tokenizer under `xml2lua.parser` (lua/xml2lua.lua) and so under APISIX's
//! body-transformer: `require("moongate.xml").events(text)` reads a document with quick-xml
//! and returns its events as a Lua array, which the Lua side hands to the handler
//! (`starttag`, `endtag`, `text`, `cdata`, `comment`, `decl`, `pi`, `dtd`), as xml2lua's own
//! Lua tokenizer would.
//!
//! Each event is `{kind, name, attrs}` for tags, `{kind, text}` otherwise. Text has its
//! character and predefined entity references expanded; an unknown entity stays as written
//! (`&name;`), as xml2lua leaves it. A document that is not well formed (a close tag that does
//! not match, an unclosed tag at the end, a broken attribute) raises a Lua error naming the
//! byte offset, which callers catch with `pcall`.

use mlua::{Lua, MultiValue, Table};
use quick_xml::events::Event;
use quick_xml::Reader;

/// Installs `moongate.xml` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "moongate.xml",
        lua.create_function(|lua, _: MultiValue| {
            let m = lua.create_table()?;
            m.set(
                "events",
                lua.create_function(|lua, text: mlua::String| events(lua, &text.as_bytes()))?,
            )?;
            Ok(m)
        })?,
    )?;
    Ok(())
}

fn parse_error(reader: &Reader<&[u8]>, e: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(format!(
        "XML parse error at byte {}: {e}",
        reader.error_position()
    ))
}

/// The predefined XML entities; others are left as written.
fn predefined(name: &str) -> Option<&'static str> {
    Some(match name {
        "lt" => "<",
        "gt" => ">",
        "amp" => "&",
        "apos" => "'",
        "quot" => "\"",
        _ => return None,
    })
}

fn events(lua: &Lua, input: &[u8]) -> mlua::Result<Table> {
    let mut reader = Reader::from_reader(input);
    reader.config_mut().check_end_names = true;
    let out = lua.create_table()?;
    // Text arrives in pieces split at entity references; they are joined into one event.
    let mut text = String::new();
    let mut depth = 0usize;
    let flush = |text: &mut String, out: &Table| -> mlua::Result<()> {
        if !text.is_empty() {
            let ev = lua.create_table()?;
            ev.set("kind", "text")?;
            ev.set("text", std::mem::take(text))?;
            out.push(ev)?;
        }
        Ok(())
    };
    loop {
        let ev = reader.read_event().map_err(|e| parse_error(&reader, e))?;
        match ev {
            Event::Text(t) => {
                let s = t.xml_content().map_err(|e| parse_error(&reader, e))?;
                text.push_str(&s);
                continue;
            }
            Event::GeneralRef(r) => {
                match r.resolve_char_ref().map_err(|e| parse_error(&reader, e))? {
                    Some(c) => text.push(c),
                    None => {
                        let name = r.decode().map_err(|e| parse_error(&reader, e))?;
                        match predefined(&name) {
                            Some(s) => text.push_str(s),
                            None => {
                                text.push('&');
                                text.push_str(&name);
                                text.push(';');
                            }
                        }
                    }
                }
                continue;
            }
            _ => flush(&mut text, &out)?,
        }
        let item = lua.create_table()?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let attrs = lua.create_table()?;
                for a in e.attributes() {
                    let a = a.map_err(|e| parse_error(&reader, e))?;
                    let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                    let value = a.unescape_value().map_err(|e| parse_error(&reader, e))?;
                    attrs.set(key, value.as_ref())?;
                }
                item.set("kind", "starttag")?;
                item.set("name", name.as_str())?;
                item.set("attrs", attrs)?;
                out.push(item)?;
                if matches!(ev, Event::Empty(_)) {
                    let end = lua.create_table()?;
                    end.set("kind", "endtag")?;
                    end.set("name", name)?;
                    out.push(end)?;
                } else {
                    depth += 1;
                }
            }
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                item.set("kind", "endtag")?;
                item.set("name", String::from_utf8_lossy(e.name().as_ref()).as_ref())?;
                out.push(item)?;
            }
            Event::Eof => break,
            other => {
                let (kind, raw): (&str, &[u8]) = match &other {
                    Event::CData(c) => ("cdata", c),
                    Event::Comment(c) => ("comment", c),
                    Event::Decl(d) => ("decl", d),
                    Event::PI(p) => ("pi", p),
                    Event::DocType(d) => ("dtd", d),
                    _ => continue,
                };
                item.set("kind", kind)?;
                item.set("text", String::from_utf8_lossy(raw).as_ref())?;
                out.push(item)?;
            }
        }
    }
    if depth > 0 {
        return Err(mlua::Error::runtime(format!(
            "XML parse error at byte {}: {depth} unclosed tag(s) at the end of the document",
            input.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `code` (which `error`s on a mismatch) with moongate.xml, xml2lua and
    /// xmlhandler.tree requireable.
    fn run(code: &str) {
        let lua = Lua::new();
        let package: Table = lua.globals().get("package").expect("package");
        let preload: Table = package.get("preload").expect("preload");
        install(&lua, &preload).expect("install");
        for (name, src) in crate::plugin::lua::embedded::MODULES {
            if *name == "xml2lua" || *name == "xmlhandler.tree" {
                let src: &'static str = src;
                let f = lua
                    .create_function(move |lua, _: MultiValue| lua.load(src).eval::<mlua::Value>())
                    .expect("loader");
                preload.set(*name, f).expect("preload");
            }
        }
        if let Err(e) = lua.load(code).exec() {
            panic!("{e}");
        }
    }

    const EQ: &str = r#"
        local function eq(got, want)
            if got ~= want then
                error(("got %s, want %s"):format(tostring(got), tostring(want)), 2)
            end
        end
        local xml2lua = require("xml2lua")
        local tree = require("xmlhandler.tree")
        local function parse(xml)
            local h = tree:new()
            xml2lua.parser(h):parse(xml)
            return h.root
        end
    "#;

    #[test]
    fn the_tree_has_the_librarys_shape() {
        run(&format!(
            r#"{EQ}
            local r = parse([==[<?xml version="1.0"?>
                <people>
                  <person type="natural"><name>Manoel</name><city>Palmas-TO</city></person>
                  <person type="legal"><name>A &amp; B &#233;</name><city><![CDATA[<x>]]></city></person>
                  <!-- a comment -->
                  <empty/>
                  <note lang="en">hi</note>
                </people>]==])
            local people = r.people
            eq(#people.person, 2)
            eq(people.person[1]._attr.type, "natural")
            eq(people.person[1].name, "Manoel")
            eq(people.person[2].name, "A & B é")
            eq(people.person[2].city, "<x>")
            eq(type(people.empty), "table"); eq(next(people.empty), nil)
            eq(people.note._attr.lang, "en"); eq(people.note[1], "hi")
            -- namespaces stay in the names (body-transformer strips them)
            local s = parse('<soap:Envelope xmlns:soap="urn:x"><soap:Body><n>1</n></soap:Body></soap:Envelope>')
            eq(s["soap:Envelope"]["soap:Body"].n, "1")
            eq(s["soap:Envelope"]._attr["xmlns:soap"], "urn:x")
            -- noreduce keeps an array for one element
            local h = tree:new()
            h.options.noreduce.item = true
            xml2lua.parser(h):parse("<list><item>a</item></list>")
            eq(h.root.list.item[1], "a")
            "#
        ));
    }

    #[test]
    fn a_broken_document_is_an_error_the_caller_can_catch() {
        run(&format!(
            r#"{EQ}
            for _, bad in ipairs({{ "<a><b></a>", "<a>", "<a x=1></a>" }}) do
                local ok, err = pcall(parse, bad)
                eq(ok, false)
                assert(tostring(err):find("XML parse error", 1, true), tostring(err))
            end
            "#
        ));
    }
}
