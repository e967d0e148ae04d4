// A group box: a titled rectangle behind the nodes; dragging it moves the nodes inside (Canvas does that).
import { NodeResizer, type NodeProps } from "@xyflow/react";
import { memo, useState } from "react";
import { activeTab, useEditor } from "../store/editor";

export interface GroupData extends Record<string, unknown> {
  index: number;
}

function GroupViewInner({ data, selected }: NodeProps & { data: GroupData }) {
  const group = useEditor((s) => activeTab(s).graph.groups[data.index]);
  const edit = useEditor((s) => s.edit);
  const [renaming, setRenaming] = useState(false);
  if (!group) return null;
  const setTitle = (title: string) => edit((g) => ({ ...g, groups: g.groups.map((x, i) => (i === data.index ? { ...x, title } : x)) }), "coalesce");
  return (
    <div className={`sd-group${selected ? " selected" : ""}`} style={{ borderColor: group.color, background: `${group.color ?? "#3f789e"}33` }}
      data-testid={`group-${data.index}`}>
      <NodeResizer isVisible={selected} minWidth={80} minHeight={60} onResizeEnd={(_, p) => edit((g) => ({ ...g, groups: g.groups.map((x, i) =>
        i === data.index ? { ...x, bounding: [p.x, p.y, p.width, p.height] as [number, number, number, number] } : x) }))} />
      <div className="sd-group-title" style={{ fontSize: Math.min(group.fontSize ?? 24, 28), background: group.color }}
        onDoubleClick={() => setRenaming(true)}>
        {renaming ? (
          <input autoFocus className="nodrag" defaultValue={group.title} onBlur={(e) => { setTitle(e.target.value); setRenaming(false); }}
            onKeyDown={(e) => e.key === "Enter" && (e.target as HTMLInputElement).blur()} />
        ) : group.title}
      </div>
    </div>
  );
}

export const GroupView = memo(GroupViewInner);
