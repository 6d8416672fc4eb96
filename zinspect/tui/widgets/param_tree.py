"""The module tree: children are added only when a node is first expanded (300k names stay fast)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.widgets import Tree
from textual.widgets.tree import NodeID, TreeNode
from textual.worker import get_current_worker

from zinspect.core import fmt
from zinspect.core.tree import ModuleNode, ordered_children
from zinspect.tui.inspection import Inspection, split_ahead
from zinspect.tui.messages import ExclusionToggled, ParamChosen
from zinspect.tui.text import literal, params_and_buffers
from zinspect.tui.widgets.virtual_table import ROWS_AT_ONCE


def node_label(node: ModuleNode, view: Inspection) -> Text:
    """`name  shape · numel · size  marks` for a param, `name  N params · numel · size` above."""
    excluded = view.excluded_in(node)
    label = literal(node.name, 200, style="strike dim" if excluded == node.count else "")
    if node.is_param:
        e = view.entry(node.path)
        shape = "×".join(map(str, e.shape)) or "scalar"
        label.append(f"  {shape} · {fmt.short_count(node.numel)} · {fmt.size(node.nbytes)}",
                     style="dim")
        if view.is_buffer(node.path):
            label.append(" buffer", style="blue")
        if getattr(e, "frozen", False):
            label.append(" frozen", style="cyan")
        if getattr(e, "tied_to", None):
            label.append_text(Text.assemble(" tied→", literal(e.tied_to, 120), style="magenta"))
        if excluded:
            label.append(" excluded", style="red")
    else:
        buffers = view.buffers_in(node)
        params = node.count - buffers
        label.append(f"  {params_and_buffers(params, buffers)} · {fmt.short_count(node.numel)} · "
                     f"{fmt.size(node.nbytes)}", style="dim")
        if excluded:
            label.append(f" {excluded}/{node.count} excluded", style="red")
    flagged = view.flagged_in(node)
    if flagged:
        label.append(" !" if node.is_param else f" !{flagged}", style="bold yellow")
    return label


#: a node's label until it is first drawn (one shared Text: 33,000 children make none); its
#: name and the rest (sizes, marks) are about this much wider (a guess: it only sets how far
#: the tree scrolls sideways before the label is drawn)
UNDRAWN = Text()
LABEL_TAIL = 32


class ParamTree(Tree[ModuleNode]):
    """Tree of modules and params; `space` excludes the param or module under the cursor.

    A module of 33,000 layers opens in one step, not 33,000 (`Tree.add` redraws the tree each
    time: 3 s there), and a node's label is made when it is first drawn: opening a module or
    changing the selection costs the lines on screen, not every node built so far."""

    BINDINGS = [
        Binding("space", "toggle_exclude", "Exclude", id="exclude",
                tooltip="Exclude the param or module from the merge, or include it again"),
    ]

    def __init__(self, view: Inspection, **kwargs) -> None:
        #: nodes whose label is to be made (from their data) when next drawn
        self._stale: set[NodeID] = set()
        super().__init__("model", **kwargs)  # the module tree: when first shown
        self.view = view
        self.sort = "model"
        self.show_root = False
        self.guide_depth = 3

    def on_mount(self) -> None:
        self.root.expand()

    def on_show(self) -> None:
        """The top level when the tree is first on screen: the load worker makes the module
        tree after the tabs are drawn (waited for here if the user is quicker)."""
        if not self.root.children:
            self.populate(self.root)
            if self.root.children:  # a checkpoint whose model states name no param has none
                self.call_after_refresh(self.move_cursor_to_line, 0)

    def populate(self, node: TreeNode[ModuleNode]) -> None:
        """Add the children of `node` (once), all at once; their labels are made when drawn."""
        if node is self.root and node.data is None:
            node.data = self.view.tree
        if node.children or node.data is None:
            return
        for child in ordered_children(node.data, self.sort):
            added = self._add_node(node, UNDRAWN, child)
            added._allow_expand = child.has_children
            node._children.append(added)
            self._stale.add(added.id)
        node._updates += 1
        self._invalidate()

    def process_label(self, label: str | Text) -> Text:
        """Our labels are one line of escaped Text already (the base class copies each)."""
        return label if isinstance(label, Text) else super().process_label(label)

    def render_label(self, node: TreeNode[ModuleNode], base_style: Style, style: Style) -> Text:
        if node.id in self._stale and node.data is not None:
            self._stale.discard(node.id)
            node._label = node_label(node.data, self.view)
        return super().render_label(node, base_style, style)

    def get_label_width(self, node: TreeNode[ModuleNode]) -> int:
        """Measured without drawing: the tree measures every line it shows at each change."""
        toggle = 2 if node._allow_expand else 0
        if node._label is UNDRAWN and node.data is not None:
            return toggle + len(node.data.name) + LABEL_TAIL
        return toggle + node._label.cell_len

    def _on_tree_node_expanded(self, event: Tree.NodeExpanded[ModuleNode]) -> None:
        if event.node is not self.root:  # expanded at mount, filled when shown
            self.populate(event.node)
            data = event.node.data
            if data is not None and data.count > ROWS_AT_ONCE:  # (else no child has more)
                self.split_ahead(data)

    @work(thread=True, exit_on_error=False, group="ahead",
          description="splitting the largest modules below the one opened")
    def split_ahead(self, node: ModuleNode) -> None:
        """While the user looks at a module just opened: its largest children split off
        (33,000 layers in 0.25 s), so that they open at once too (at once: the user is in
        the tree, and opens the next one in a moment)."""
        worker = get_current_worker()
        split_ahead(node, ROWS_AT_ONCE, lambda: not worker.is_cancelled)

    def _on_tree_node_selected(self, event: Tree.NodeSelected[ModuleNode]) -> None:
        data = event.node.data
        if data is not None and data.is_param and not data.has_children:
            self.post_message(ParamChosen(data.path))

    def action_toggle_exclude(self) -> None:
        node = self.cursor_node
        if node is None or node.data is None:
            return
        data = node.data
        what = data.path if data.is_param and not data.has_children else (
            f"{data.path} ({fmt.count(data.count)} params)")
        self.post_message(ExclusionToggled(list(data.params()), what))

    def set_sort(self, sort: str) -> None:
        """Re-order the tree, keeping which modules are open and the cursor's place (a sort
        chosen in the table must not close what the user opened in the tree)."""
        opened = self.expanded_paths()
        at = self.cursor_node.data.path if self.cursor_node and self.cursor_node.data else None
        self.sort = sort
        # a new root, not root.remove_children(): that finds each node in its parent's list,
        # 5.6 s of a frozen UI for 33,000 layers open
        self.clear()
        self._stale.clear()  # (the new nodes' ids start again from 0)
        self.populate(self.root)
        stack = list(self.root.children)
        while stack:
            node = stack.pop()
            if node.data is not None and node.data.path in opened:
                self.populate(node)
                node.expand()
                stack.extend(node.children)
        if at is not None:
            self.reveal(at)

    def expanded_paths(self) -> set[str]:
        """The modules open now (only nodes already built can be)."""
        out, stack = set(), list(self.root.children)
        while stack:
            node = stack.pop()
            if node.is_expanded and node.data is not None:
                out.add(node.data.path)
                stack.extend(node.children)
        return out

    def refresh_labels(self) -> None:
        """Re-make the labels of the nodes on screen now and of the others when next drawn
        (after the selection changed)."""
        stack = list(self.root.children)
        while stack:
            node = stack.pop()
            self._stale.add(node.id)
            stack.extend(node.children)
        top = self.scroll_offset.y
        for line in self._tree_lines[top:top + self.size.height + 1]:
            self.render_label(line.node, Style(), Style())
        self._clear_line_cache()
        self.refresh()

    def reveal(self, path: str) -> TreeNode[ModuleNode] | None:
        """Expand the modules down to `path` and put the cursor on it."""
        node = self.root
        parts = path.split(".")
        for i in range(len(parts)):
            self.populate(node)
            prefix = ".".join(parts[: i + 1])
            found = next((c for c in node.children if c.data and c.data.path == prefix), None)
            if found is None:
                return None
            node = found
            if i < len(parts) - 1:
                node.expand()
        self.call_after_refresh(self.move_cursor, node)
        return node
