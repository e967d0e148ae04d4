// Pending, running and finished prompts: cancel a pending one, stop the running one, open a past one.
import { useEffect, useState } from "react";
import { deleteQueued, fetchHistory, fetchQueue, interrupt, viewUrl, type HistoryEntry, type QueueState } from "../api/client";
import { useRun } from "../store/run";

export interface QueuePanelProps {
  onOpenPast(entry: HistoryEntry): void;
}

export function QueuePanel({ onOpenPast }: QueuePanelProps) {
  const version = useRun((s) => s.queueVersion);
  const [queue, setQueue] = useState<QueueState>({ queue_running: [], queue_pending: [] });
  const [history, setHistory] = useState<[string, HistoryEntry][]>([]);
  const [error, setError] = useState<string | null>(null);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let cancelled = false;
    Promise.all([fetchQueue(), fetchHistory(30)]).then(([q, h]) => {
      if (cancelled) return;
      setQueue(q);
      setHistory(Object.entries(h).sort((a, b) => b[1].prompt[0] - a[1].prompt[0]));
      setError(null);
    }).catch((e: Error) => !cancelled && setError(e.message));
    return () => { cancelled = true; };
  }, [version, tick]);
  const refresh = () => setTick((t) => t + 1);
  return (
    <aside className="queue-panel" data-testid="queue-panel">
      <h3>Queue <button type="button" onClick={refresh}>↻</button></h3>
      {error && <p className="problem">{error}</p>}
      <ul>
        {queue.queue_running.map((item) => (
          <li key={item[1]} className="running" data-testid="queue-running">
            #{item[0]} running <button type="button" onClick={() => interrupt(item[1]).then(refresh)}>stop</button>
          </li>
        ))}
        {queue.queue_pending.map((item) => (
          <li key={item[1]} className="pending" data-testid="queue-pending">
            #{item[0]} pending <button type="button" onClick={() => deleteQueued(item[1]).then(refresh)}>cancel</button>
          </li>
        ))}
      </ul>
      <h3>History</h3>
      <ul>
        {history.map(([id, entry]) => {
          const status = entry.status?.status_str ?? (entry.status?.completed ? "success" : "unknown");
          const images = Object.values(entry.outputs ?? {}).flatMap((o) => o.images ?? []);
          return (
            <li key={id} className={`past ${status}`} data-testid="history-item" title="open this workflow" onClick={() => onOpenPast(entry)}>
              <span>#{entry.prompt[0]} {status === "success" ? "done" : status === "error" ? "failed" : status}</span>
              {images.slice(0, 4).map((image, i) => <img key={i} src={viewUrl(image)} alt={image.filename} />)}
            </li>
          );
        })}
        {history.length === 0 && <li className="empty">nothing has run yet</li>}
      </ul>
    </aside>
  );
}
