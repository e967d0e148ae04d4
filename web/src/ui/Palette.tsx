// The node search palette: type to filter on name, display name and category; Enter adds the highlighted
// match. With an empty query the categories can be browsed as a tree.
import { useMemo, useState } from "react";
import type { ClassSchema, Schemas } from "../api/objectInfo";

export interface PaletteProps {
  schemas: Schemas;
  /** Only these classes (a dragged link's type), or all. */
  only?: string[];
  screen: { x: number; y: number };
  onPick(classType: string): void;
  onClose(): void;
}

const HELPERS_IN_PALETTE = ["Reroute", "PrimitiveNode", "Note"];

function matches(schema: ClassSchema, words: string[]): boolean {
  const haystack = `${schema.name} ${schema.title} ${schema.category}`.toLowerCase();
  return words.every((w) => haystack.includes(w));
}

export function Palette({ schemas, only, screen, onPick, onClose }: PaletteProps) {
  const [query, setQuery] = useState("");
  const [highlight, setHighlight] = useState(0);
  const [openCategories, setOpenCategories] = useState<Set<string>>(new Set());
  const all = useMemo(() => {
    const names = only ?? [...schemas.classNames(), ...HELPERS_IN_PALETTE];
    return names.map((n) => schemas.get(n)!).filter(Boolean).sort((a, b) => a.category.localeCompare(b.category) || a.title.localeCompare(b.title));
  }, [schemas, only]);
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  const found = words.length ? all.filter((s) => matches(s, words)).sort((a, b) =>
    Number(!a.title.toLowerCase().startsWith(words[0])) - Number(!b.title.toLowerCase().startsWith(words[0]))) : all;
  const categories = useMemo(() => {
    const byCategory = new Map<string, ClassSchema[]>();
    for (const s of all) byCategory.set(s.category || "other", [...(byCategory.get(s.category || "other") ?? []), s]);
    return [...byCategory.entries()];
  }, [all]);
  const pick = (schema: ClassSchema | undefined) => schema && onPick(schema.name);
  const left = Math.min(screen.x, window.innerWidth - 340);
  const top = Math.min(screen.y, window.innerHeight - 420);
  return (
    <div className="palette" style={{ left: Math.max(0, left), top: Math.max(0, top) }} onMouseDown={(e) => e.stopPropagation()}>
      <input data-testid="palette" autoFocus placeholder={only ? "nodes taking this link…" : "search nodes…"} value={query}
        onChange={(e) => { setQuery(e.target.value); setHighlight(0); }}
        onKeyDown={(e) => {
          if (e.key === "Escape") onClose();
          else if (e.key === "Enter") pick(found[highlight]);
          else if (e.key === "ArrowDown") { e.preventDefault(); setHighlight((h) => Math.min(h + 1, found.length - 1)); }
          else if (e.key === "ArrowUp") { e.preventDefault(); setHighlight((h) => Math.max(h - 1, 0)); }
        }} />
      <ul className="palette-list" role="listbox">
        {words.length || only ? found.slice(0, 60).map((schema, i) => (
          <li key={schema.name} role="option" aria-selected={i === highlight} className={i === highlight ? "active" : ""}
            onMouseEnter={() => setHighlight(i)} onClick={() => pick(schema)} data-testid={`palette-item-${schema.name}`}>
            <b>{schema.title}</b> <small>{schema.category}</small>
          </li>
        )) : categories.map(([category, schemasInCategory]) => (
          <li key={category} className="category">
            <button type="button" onClick={() => setOpenCategories((open) => {
              const next = new Set(open);
              if (next.has(category)) next.delete(category); else next.add(category);
              return next;
            })}>{openCategories.has(category) ? "▾" : "▸"} {category} <small>({schemasInCategory.length})</small></button>
            {openCategories.has(category) && (
              <ul>{schemasInCategory.map((schema) => (
                <li key={schema.name} onClick={() => pick(schema)} data-testid={`palette-item-${schema.name}`}>{schema.title}</li>
              ))}</ul>
            )}
          </li>
        ))}
        {found.length === 0 && <li className="empty">no node matches</li>}
      </ul>
    </div>
  );
}
