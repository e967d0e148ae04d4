// Right-click menus: on a node (acting on the selection when the node is in it) and on the canvas.
import { useEffect } from "react";

export interface MenuItem {
  label: string;
  shortcut?: string;
  run(): void;
}

export interface ContextMenuProps {
  at: { x: number; y: number };
  items: MenuItem[];
  onClose(): void;
}

export function ContextMenu({ at, items, onClose }: ContextMenuProps) {
  useEffect(() => {
    const close = (event: KeyboardEvent) => event.key === "Escape" && onClose();
    document.addEventListener("keydown", close);
    return () => document.removeEventListener("keydown", close);
  }, [onClose]);
  return (
    <>
      <div className="menu-backdrop" onMouseDown={onClose} onContextMenu={(e) => { e.preventDefault(); onClose(); }} />
      <ul className="context-menu" role="menu" data-testid="context-menu"
        style={{ left: Math.min(at.x, window.innerWidth - 220), top: Math.min(at.y, window.innerHeight - 30 * items.length - 10) }}>
        {items.map((item) => (
          <li key={item.label} role="menuitem" tabIndex={-1} onClick={() => { onClose(); item.run(); }}>
            <span>{item.label}</span>{item.shortcut && <kbd>{item.shortcut}</kbd>}
          </li>
        ))}
      </ul>
    </>
  );
}
