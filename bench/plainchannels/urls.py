"""No HTTP routes: contender (c) serves WebSockets only."""

urlpatterns: list[object] = []
