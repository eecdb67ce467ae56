{{/*
Everything one devsync service needs: its Deployment, Service and PodDisruptionBudget, and
optionally a HorizontalPodAutoscaler or a KEDA ScaledObject. Each service's own template
(requestor.yaml, reconciler.yaml, fanout.yaml, audit.yaml) calls it with:

  (dict "root" $ "name" "<service>" "stream" "<stream it consumes>"
        "consumer" "<the durable consumer KEDA measures>"   for a service scaled on one consumer,
        "partitioned" true                 for the reconciler (reconcile-<lane>-<k>), or neither
                                           for a service without KEDA (the requestor: no
                                           `keda` values at all))

The binary is /usr/local/bin/devsync-<service>; it serves /healthz, /readyz and /metrics on 8080.
Its own settings come from devsync.serviceSettings.
*/}}
{{- define "devsync.component" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $c := index $root.Values $name }}
{{- $fullname := include "devsync.componentName" . }}
{{- $keda := default (dict "enabled" false) $c.keda }}
{{- $autoscaled := or $c.hpa.enabled $keda.enabled }}
{{- $partitions := int $root.Values.config.partitions }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "devsync.componentLabels" . | nindent 4 }}
spec:
  {{- if not $autoscaled }}
  replicas: {{ $c.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Start the new pod before stopping an old one: capacity never drops during a rollout.
      maxUnavailable: 0
      maxSurge: 1
  selector:
    matchLabels:
      {{- include "devsync.componentSelectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- mustMergeOverwrite (deepCopy (default (dict) $c.podLabels)) (include "devsync.componentLabels" . | fromYaml) | toYaml | nindent 8 }}
      annotations:
        checksum/config: {{ include "devsync.configFile" $root | sha256sum }}
        {{- with $c.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "devsync.serviceAccountName" $root }}
      {{- include "devsync.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
      {{- with $c.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $c.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      topologySpreadConstraints:
        {{- if $c.topologySpreadConstraints }}
        {{- toYaml $c.topologySpreadConstraints | nindent 8 }}
        {{- else }}
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "devsync.componentSelectorLabels" . | nindent 14 }}
        {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "devsync.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            - /usr/local/bin/devsync-{{ $name }}
          ports:
            - name: http
              containerPort: 8080
              protocol: TCP
          env:
            {{- include "devsync.env" (dict "root" $root "identity" $name "env" $c.env "settings" (include "devsync.serviceSettings" . | fromYaml)) | nindent 12 }}
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: {{ $c.startupProbe.periodSeconds }}
            timeoutSeconds: {{ $c.startupProbe.timeoutSeconds }}
            failureThreshold: {{ $c.startupProbe.failureThreshold }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            initialDelaySeconds: {{ $c.livenessProbe.initialDelaySeconds | default 0 }}
            periodSeconds: {{ $c.livenessProbe.periodSeconds }}
            timeoutSeconds: {{ $c.livenessProbe.timeoutSeconds }}
            failureThreshold: {{ $c.livenessProbe.failureThreshold }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            initialDelaySeconds: {{ $c.readinessProbe.initialDelaySeconds | default 0 }}
            periodSeconds: {{ $c.readinessProbe.periodSeconds }}
            timeoutSeconds: {{ $c.readinessProbe.timeoutSeconds }}
            failureThreshold: {{ $c.readinessProbe.failureThreshold }}
            successThreshold: {{ $c.readinessProbe.successThreshold | default 1 }}
          {{- if gt (int $c.preStopSleepSeconds) 0 }}
          lifecycle:
            # Leave the Service endpoints before SIGTERM starts the drain (no shell needed).
            preStop:
              sleep:
                seconds: {{ $c.preStopSleepSeconds }}
          {{- end }}
          resources:
            {{- toYaml $c.resources | nindent 12 }}
          {{- include "devsync.containerSecurityContext" $root | nindent 10 }}
          volumeMounts:
            {{- include "devsync.volumeMounts" (dict "root" $root "identity" $name) | nindent 12 }}
      volumes:
        {{- include "devsync.volumes" (dict "root" $root "identity" $name "configMap" (printf "%s-config" (include "devsync.fullname" $root))) | nindent 8 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "devsync.componentLabels" . | nindent 4 }}
  {{- with $c.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: ClusterIP
  selector:
    {{- include "devsync.componentSelectorLabels" . | nindent 4 }}
  ports:
    - name: http
      port: 8080
      targetPort: http
      protocol: TCP
      appProtocol: http
{{- if $c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "devsync.componentLabels" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $c.pdb.minAvailable) }}
  minAvailable: {{ $c.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $c.pdb.maxUnavailable }}
  {{- end }}
  # A pod that is not ready protects nothing: let node drains evict it.
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "devsync.componentSelectorLabels" . | nindent 6 }}
{{- end }}
{{- if $c.hpa.enabled }}
{{- $max := int $c.hpa.maxReplicas }}
{{- if .partitioned }}
{{- $max = min $max $partitions }}
{{- end }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "devsync.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullname }}
  minReplicas: {{ $c.hpa.minReplicas }}
  maxReplicas: {{ $max }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $c.hpa.targetCPUUtilizationPercentage }}
    {{- if not (kindIs "invalid" $c.hpa.targetMemoryUtilizationPercentage) }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $c.hpa.targetMemoryUtilizationPercentage }}
    {{- end }}
{{- end }}
{{- if $keda.enabled }}
{{- $k := $keda }}
{{- $g := $root.Values.keda }}
{{- $max := int $k.maxReplicaCount }}
{{- if .partitioned }}
{{- $max = min $max $partitions }}
{{- end }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "devsync.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullname }}
  pollingInterval: {{ $k.pollingInterval | default 30 }}
  cooldownPeriod: {{ $k.cooldownPeriod | default 300 }}
  minReplicaCount: {{ $k.minReplicaCount }}
  maxReplicaCount: {{ $max }}
  {{- if eq $k.trigger "metrics-api" }}
  triggers:
    # Messages stored in {{ .stream }} (WorkQueue retention: stored means not yet processed),
    # from the NATS monitoring endpoint /jsz.
    - type: metrics-api
      name: {{ .stream | lower | replace "_" "-" }}-pending
      metadata:
        url: {{ printf "%s://%s/jsz?acc=%s&streams=true" (ternary "https" "http" $g.useHttps) $g.natsMonitoringEndpoint (urlquery $g.account) | quote }}
        format: json
        valueLocation: {{ printf "account_details.0.stream_detail.#(name==\"%s\").state.messages" .stream | quote }}
        targetValue: {{ $k.lagThreshold | toString | quote }}
        activationTargetValue: {{ $k.activationLagThreshold | default 0 | toString | quote }}
  {{- else if .partitioned }}
  # KEDA's nats-jetstream scaler measures one consumer: one trigger per reconcile consumer,
  # summed into a single metric.
  advanced:
    scalingModifiers:
      formula: {{ include "devsync.partitionTriggerNames" (dict "partitions" $partitions) | trim | splitList " " | join " + " | quote }}
      target: {{ $k.lagThreshold | toString | quote }}
      activationTarget: {{ $k.activationLagThreshold | default 0 | toString | quote }}
      metricType: AverageValue
  triggers:
    {{- range $lane := list "rt" "bulk" }}
    {{- range $p := until $partitions }}
    - type: nats-jetstream
      name: {{ printf "%s_%d" $lane $p }}
      metadata:
        natsServerMonitoringEndpoint: {{ $g.natsMonitoringEndpoint | quote }}
        account: {{ $g.account | quote }}
        stream: DEVSYNC_REQ
        consumer: {{ printf "reconcile-%s-%d" $lane $p | quote }}
        lagThreshold: {{ $k.lagThreshold | toString | quote }}
        useHttps: {{ $g.useHttps | toString | quote }}
    {{- end }}
    {{- end }}
  {{- else }}
  triggers:
    # Pending + unacknowledged messages of the consumer {{ .consumer }} on {{ .stream }}.
    {{- with .note }}
    # {{ . }}
    {{- end }}
    - type: nats-jetstream
      name: {{ .consumer }}-lag
      metadata:
        natsServerMonitoringEndpoint: {{ $g.natsMonitoringEndpoint | quote }}
        account: {{ $g.account | quote }}
        stream: {{ .stream }}
        consumer: {{ .consumer | quote }}
        lagThreshold: {{ $k.lagThreshold | toString | quote }}
        activationLagThreshold: {{ $k.activationLagThreshold | default 0 | toString | quote }}
        useHttps: {{ $g.useHttps | toString | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* "rt_0 rt_1 ... bulk_<P-1>": the names of the reconciler's per-consumer KEDA triggers. */}}
{{- define "devsync.partitionTriggerNames" -}}
{{- range $lane := list "rt" "bulk" }}
{{- range $p := until (int $.partitions) }}
{{- printf "%s_%d " $lane $p }}
{{- end }}
{{- end }}
{{- end }}
